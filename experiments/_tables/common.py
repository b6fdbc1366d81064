"""Renderers any page may use: a study's generated report, a text file as it was written."""

from __future__ import annotations

from _tables import RESULTS, renderer


@renderer("study")
def study(name: str) -> str:
    """The tables of experiments/results/studies/<name>/results.md (written by the sweep's own
    report from its sweep.json), without its title line."""
    lines = (RESULTS / "studies" / name / "results.md").read_text().splitlines()
    return "\n".join(lines[1:] if lines and lines[0].startswith("#") else lines).strip("\n")


@renderer("text")
def text(path: str) -> str:
    """A text file under experiments/results/ in a code block (a benchmark's printed output)."""
    return "```\n" + (RESULTS / path).read_text().rstrip("\n") + "\n```"
