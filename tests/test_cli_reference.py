"""docs/cli.md is the page ``python -m multitune.cli_reference`` generates from the command's parser."""

from __future__ import annotations

from multitune.cli_reference import reference
from tests.conftest import REPO


def test_cli_reference_is_current():
    assert (REPO / "docs" / "cli.md").read_text(encoding="utf-8") == reference(), \
        "regenerate docs/cli.md: python -m multitune.cli_reference"


def test_cli_reference_covers_every_command():
    page = reference()
    for command in ("train", "evaluate", "predict", "embed", "export", "serve", "search", "compare", "merge",
                    "report", "vocab extend", "tasks", "quickstart"):
        assert f"\n## multitune {command}\n" in page, command
