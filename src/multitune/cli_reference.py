"""Markdown reference of the ``multitune`` command, generated from its argparse parser (docs/cli.md).

    python -m multitune.cli_reference              # writes docs/cli.md of the source tree
    python -m multitune.cli_reference --stdout     # prints it instead

The page lists every subcommand with its usage line and one row per argument (name, default, what it
does), so that it never drifts from ``multitune COMMAND --help``; a test compares the committed page with
:func:`reference`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from multitune.cli import build_parser

# Usage lines are wrapped at a fixed width, not at the terminal's, so the page is the same on every machine.
_WIDTH = 100

_INTRO = """\
# Command-line reference

Generated from the `multitune` command's own parser (`python -m multitune.cli_reference`); a test keeps
this page in step with the code. `multitune COMMAND --help` prints the same text in a terminal.

Every failure of a command (a bad config, bad data, a bad run directory, a bad flag) is one line on stderr,
`multitune: error: ...`, and exit status 2. `--set KEY=VALUE` overrides take the same dotted field paths as
the [configuration reference](config.md).
"""


def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """``(name, one-line help, parser)`` for every subcommand of ``parser``, nested ones included
    (``vocab extend``), in the order the command lists them."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                found.append((name, helps.get(name, ""), sub))
                found += [(f"{name} {child}", text, p) for child, text, p in _subparsers(sub)]
    return found


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(prog=parser.prog, width=_WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    return formatter.format_help().strip()


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _name(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    names = ", ".join(action.option_strings)
    if action.nargs == 0:
        return f"`{names}`"
    metavar = action.metavar or (action.dest.upper() if not action.choices else "{" + ",".join(map(str, action.choices)) + "}")
    return f"`{names} {metavar}`"


def _default(action: argparse.Action) -> str:
    if action.nargs in ("*", "?") and not action.option_strings:
        return "optional" if action.nargs == "?" else "zero or more"
    if action.required:
        return "required"
    if action.nargs == 0 or action.default in (None, [], argparse.SUPPRESS):
        return ""
    return f"`{action.default}`"


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:
        text = text % {**vars(action), "prog": ""}
    if action.choices and not text:  # the choices are in the name column; say so when there is nothing else
        text = "one of " + " / ".join(f"`{c}`" for c in action.choices)
    return _cell(text)


def _arguments(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction, argparse._VersionAction)):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        rows.append(f"| {_name(action)} | {_default(action)} | {_help(action)} |")
    if not rows:
        return []
    return ["| argument | default | what it does |", "|---|---|---|", *rows]


def reference() -> str:
    """The markdown page: the intro, a list of commands, then one section per (sub)command."""
    parser = build_parser()
    commands = _subparsers(parser)
    lines = [_INTRO, "## Commands", ""]
    lines += [f"- [`multitune {name}`](#multitune-{name.replace(' ', '-')}): {_cell(text)}"
              for name, text, _ in commands]
    for name, text, sub in commands:
        lines += ["", f"## multitune {name}", ""]
        if text:
            lines += [_cell(text)[:1].upper() + _cell(text)[1:] + ".", ""]
        lines += ["```text", _usage(sub), "```"]
        table = _arguments(sub)
        if table:
            lines += ["", *table]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description="Write the CLI reference page (docs/cli.md).")
    args.add_argument("--stdout", action="store_true", help="print the page instead of writing docs/cli.md")
    args.add_argument("--output", default=None, help="file to write (default: docs/cli.md of the source tree)")
    opts = args.parse_args(argv)
    page = reference()
    if opts.stdout:
        sys.stdout.write(page)
        return 0
    out = Path(opts.output) if opts.output else Path(__file__).resolve().parents[2] / "docs" / "cli.md"
    out.write_text(page, encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
