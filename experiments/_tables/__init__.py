"""Table renderers for `make docs` (experiments/make_docs.py): each turns files under
experiments/results/ into one markdown table. A renderer module registers its functions with
`@renderer("name")`; every module in this folder is imported below, so a new one is one file."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"
RENDERERS: dict[str, Callable[..., str]] = {}


def renderer(name: str):
    def register(fn):
        assert name not in RENDERERS, f"two table renderers named {name}"
        RENDERERS[name] = fn
        return fn

    return register


def load(name: str):
    """The JSON file experiments/results/<name>."""
    return json.loads((RESULTS / name).read_text())


def markdown(header: list[str], rows: list[list]) -> str:
    """A markdown table: header cells, then rows of cells already formatted as strings."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


for _module in sorted(Path(__file__).parent.glob("[!_]*.py")):  # each registers its renderers
    importlib.import_module(f"_tables.{_module.stem}")
