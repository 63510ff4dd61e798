"""The user's pages read as references, not as a lab notebook.

README.md stays a user's page (at most 200 lines), and neither it nor docs/*.md speaks of
how the work went: sessions, issue numbers, times of day.  The history is
docs/bench/HISTORY.md's, and commit messages'.  Every relative link in them points to a file
that exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOTEBOOK = re.compile(r"\bsessions?\b|\bissues? #?\d+|\b\d{2}:\d{2}(-\d{2}:\d{2})? UTC\b|\bthis tree\b",
                      re.IGNORECASE)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_readme_is_a_page_not_a_log():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_words_about_how_the_work_went(page):
    hits = [f"{page.name}:{n}: {line.strip()}" for n, line in enumerate(page.read_text().splitlines(), 1)
            if NOTEBOOK.search(line)]
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_point_to_files(page):
    missing = [target for target in LINK.findall(page.read_text())
               if "://" not in target and not target.startswith("mailto:")
               and not (page.parent / target).exists()]
    assert not missing, missing


def test_the_check_sees_a_notebook_line():
    for line in ("as measured this session", "see issue #29", "at 14:05 UTC", "Issue 21 asks"):
        assert NOTEBOOK.search(line), line
    assert not NOTEBOOK.search("the decoder's rows kept full; 2026-12-05, a 2-core EPYC")
