"""The docs stay true: the config reference matches the code, and the index links only existing pages."""

from __future__ import annotations

import re

from multitune.config.reference import reference
from tests.conftest import REPO


def test_config_reference_is_current():
    assert reference().strip() in (REPO / "docs" / "config.md").read_text(encoding="utf-8"), \
        "regenerate docs/config.md: python -m multitune.config.reference"


def test_doc_links_exist():
    for page in ("README.md", "docs/index.md"):
        for link in re.findall(r"\]\(([^)#]+\.md)\)", (REPO / page).read_text(encoding="utf-8")):
            base = REPO if page == "README.md" else REPO / "docs"
            assert (base / link).is_file(), f"{page} links a missing page {link}"
