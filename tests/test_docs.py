"""The docs are generated: every measured table in README.md and docs/*.md is what
experiments/make_docs.py writes from experiments/results/, and the README stays a page."""

import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "experiments"))

import make_docs  # noqa: E402
import pytest  # noqa: E402


@pytest.mark.slow  # the parameter-count tables build every paper config's abstract model
def test_committed_docs_are_what_make_docs_writes():
    stale = [
        str(p.relative_to(ROOT)) for p in make_docs.pages()
        if make_docs.regenerate(p.read_text()) != p.read_text()
    ]  # fmt: skip
    assert not stale, f"{stale} differ from their generated tables: run `make docs` and commit"
    blocks = sum(len(make_docs.BLOCK.findall(p.read_text())) for p in make_docs.pages())
    assert blocks >= 20  # the check has something to check


def test_a_hand_edited_table_is_caught():
    page = (make_docs.ROOT / "README.md").read_text()
    assert "<!-- table: headlines -->" in page
    edited = page.replace("0 lost", "1 lost", 1)
    assert edited != page and make_docs.regenerate(edited) == page


def test_the_readme_is_a_page():
    lines = (make_docs.ROOT / "README.md").read_text().count("\n")
    assert lines <= 300, f"README.md has {lines} lines: move the rest to docs/"
