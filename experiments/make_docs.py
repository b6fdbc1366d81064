"""`make docs`: regenerates every measured table in README.md and docs/*.md from the JSON under
experiments/results/, so that no number in a table is copied by hand.

A generated block sits between two comment lines in a page:

    <!-- table: NAME [ARG ...] -->
    | ... the table, written by the renderer NAME ... |
    <!-- end table -->

NAME is a renderer registered in `experiments/_tables/` (`@renderer("NAME")`), called with the
ARGs as strings; it reads its files under experiments/results/ and returns markdown. Everything
outside the blocks is prose, edited by hand. `--check` writes nothing and exits 1 naming each page
that differs from what this script would write (tests/test_docs.py runs it).

    python experiments/make_docs.py [--check]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import _paths  # noqa: F401
from _tables import RENDERERS, ROOT

PAGES = ("README.md", "docs/*.md")
BLOCK = re.compile(
    r"^(?P<open><!-- table: (?P<spec>[^\n]*?) -->)\n(?P<body>.*?)^(?P<close><!-- end table -->)$",
    re.M | re.S,
)


def render(spec: str) -> str:
    name, *args = spec.split()
    if name not in RENDERERS:
        known = ", ".join(sorted(RENDERERS))
        raise SystemExit(f"error: no table renderer '{name}' (known: {known})")
    return RENDERERS[name](*args).strip("\n") + "\n"


def regenerate(text: str) -> str:
    """`text` with every generated block written anew."""
    return BLOCK.sub(lambda m: f"{m['open']}\n{render(m['spec'])}{m['close']}", text)


def pages() -> list[Path]:
    return sorted(p for pattern in PAGES for p in ROOT.glob(pattern))


def main(argv: list[str]) -> int:
    check = "--check" in argv[1:]
    stale = []
    for page in pages():
        old = page.read_text()
        new = regenerate(old)
        if new != old:
            stale.append(str(page.relative_to(ROOT)))
            if not check:
                page.write_text(new)
    if check and stale:
        print(f"stale: {', '.join(stale)}: run `make docs` and commit what it writes")
        return 1
    print(("would rewrite " if check else "rewrote ") + (", ".join(stale) or "nothing"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
