"""Loaders of the pack's JSON lines, found beside this file (lm-eval resolves `!function` here)."""

from pathlib import Path

DATA = Path(__file__).parent / "data"


def _load(name: str):
    import datasets

    return datasets.DatasetDict(
        {"test": datasets.Dataset.from_json(str(DATA / f"{name}.jsonl"), keep_in_memory=True)}
    )


def next_line(**kwargs):
    return _load("next_line")


def last_word(**kwargs):
    return _load("last_word")


def ppl(**kwargs):
    return _load("ppl")
