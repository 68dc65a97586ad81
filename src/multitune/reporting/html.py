"""``multitune report RUN_DIR``: one self-contained HTML page about a finished run.

The page needs nothing else: every plot is embedded as a base64 PNG, the style is inline, there is no script
and no network access. The plots are also written as PNG files to ``RUN_DIR/report/``.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

from multitune import __version__
from multitune.fileio import write_text_atomic
from multitune.reporting.markup import esc, table
from multitune.reporting.run import load_run
from multitune.reporting.sections import SECTIONS, Figures, Omitted

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330; margin: 0; background: #f6f7f9; }
main { max-width: 1180px; margin: 0 auto; padding: 1.5em 2em 4em; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; }
h2 { font-size: 1.25em; border-bottom: 2px solid #d7dbe3; padding-bottom: 0.2em; margin-top: 0; }
h3 { font-size: 1.02em; margin: 1.2em 0 0.4em; }
.meta { color: #5b6475; margin-top: 0; }
nav { background: #fff; border: 1px solid #d7dbe3; border-radius: 6px; padding: 0.5em 1em; margin: 1em 0; }
nav a { margin-right: 1.1em; color: #2456b3; text-decoration: none; white-space: nowrap; }
section { background: #fff; border: 1px solid #d7dbe3; border-radius: 6px; padding: 1em 1.4em; margin: 1.2em 0; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.93em; }
th, td { border-bottom: 1px solid #e3e6ec; padding: 0.25em 0.8em; text-align: left; vertical-align: top; }
th { background: #f0f2f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv td:first-child { color: #5b6475; }
table.kv td.num { text-align: left; }
figure { margin: 0.8em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eceef2; }
figcaption { color: #5b6475; font-size: 0.9em; }
details { margin: 0.6em 0; }
summary { cursor: pointer; color: #2456b3; }
pre { background: #f4f5f8; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


@dataclass
class Report:
    """What :func:`write_report` wrote."""

    path: Path
    sections: list[str]
    omitted: dict[str, str]  # section id -> why it is not on the page
    figures: list[Path] = field(default_factory=list)


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Report:
    """Write the report of a finished run: ``RUN_DIR/report.html`` (or ``output``) and ``RUN_DIR/report/*.png``.

    Args:
        run_dir: a run directory (``results.json`` and ``metrics.jsonl``; a sequential run's stages each
            hold their own ``metrics.jsonl``).
        output: the HTML file to write (default ``RUN_DIR/report.html``); written atomically.

    Returns:
        The page's path, the ids of its sections, the sections left out with the reason, and the PNGs.

    Raises:
        MultituneError: ``run_dir`` is not a run directory (the message names the missing file).
    """
    run = load_run(run_dir)
    figs = Figures(run.path / "report")
    figs.directory.mkdir(exist_ok=True)
    bodies: list[tuple[str, str, str]] = []
    omitted: dict[str, tuple[str, str]] = {}
    for section_id, title, build in SECTIONS:
        result = build(run, figs)
        if isinstance(result, Omitted):
            omitted[section_id] = (title, result.reason)
        else:
            bodies.append((section_id, title, result))
    for stale in figs.directory.glob("*.png"):  # plots of an earlier report that this one does not have
        if stale not in figs.written:
            stale.unlink()

    nav = "".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title, _ in bodies)
    sections = "".join(f'<section id="{sid}"><h2>{esc(title)}</h2>{body}</section>' for sid, title, body in bodies)
    left_out = (table(["section", "why it is left out"], list(omitted.values())) if omitted
                else "<p>None: the run has data for every section.</p>")
    sections += f'<section id="omitted"><h2>Sections left out</h2>{left_out}</section>'
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>multitune report: {esc(run.path.resolve().name)}</title><style>{CSS}</style></head>"
            f"<body><main><h1>Run report: {esc(run.path.resolve().name)}</h1>"
            f'<p class="meta">{esc(run.path.resolve())} &middot; written by multitune {esc(__version__)} on '
            f"{esc(when)}</p><nav>{nav}</nav>{sections}</main></body></html>\n")
    path = Path(output) if output is not None else run.path / "report.html"
    write_text_atomic(path, page)
    return Report(path, [sid for sid, _, _ in bodies], {sid: why for sid, (_, why) in omitted.items()},
                  list(figs.written))
