"""Builds the offline task pack `mole_offline` from the held-out documents of the default corpus.

    python -m mole_jax.eval.tasks.build [--val_fraction=0.05] [--seed=0]

The documents are those `corpora.split_documents` holds out of `shakespeare` at the default
`data.val_fraction` (Henry VI part 2 and A Lover's Complaint at 0.05), so a model trained on the
default corpus with that fraction never saw them. Three tasks, written as JSON lines beside the
task YAMLs (`mole_jax/eval/tasks/mole_offline/`), with `pack.json` recording the sources' SHA-256:

- `mole_next_line` (multiple choice): a speaker and the three verse lines before a line; pick
  that line among it and three other lines of the same document.
- `mole_last_word` (LAMBADA-style): a speaker and up to three lines, the last word held back;
  accuracy of the greedy continuation and its perplexity.
- `mole_ppl` (rolling log-likelihood): passages of consecutive speeches, word and byte
  perplexity and bits per byte.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np

from mole_jax.data import corpora

PACK = Path(__file__).parent / "mole_offline"
SIZES = {"next_line": 400, "last_word": 400, "ppl": 40}
_SPEAKER = re.compile(r"^[A-Z][A-Z' .,&-]*\.$")
_LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z][a-z']{2,})([.,;:!?]*)$")


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker label, verse lines) of each speech: blank-line separated blocks whose first line
    is an upper-case label; stage directions in brackets are left out, and so are blocks with
    further labels (the list of persons)."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [x.rstrip() for x in block.strip("\n").split("\n")]
        if len(lines) < 2 or not _SPEAKER.match(lines[0].strip()):
            continue
        verse = [x for x in lines[1:] if x.strip() and not x.lstrip().startswith("[")]
        if verse and not any(_SPEAKER.match(x.strip()) or x.isupper() for x in verse):
            out.append((lines[0].strip(), verse))
    return out


def next_line_items(docs: list[list], n: int, rng) -> list[dict]:
    pool = []
    for d, doc in enumerate(docs):
        for s, (_, verse) in enumerate(doc):
            pool += [(d, s, i) for i in range(3, len(verse))]
    picks = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    items = []
    for p in sorted(picks):
        d, s, i = pool[p]
        speaker, verse = docs[d][s]
        lines = [x for _, v in docs[d] for x in v if x != verse[i]]
        others = [lines[j] for j in rng.choice(len(lines), size=3, replace=False)]
        choices = others + [verse[i]]
        order = rng.permutation(4)
        items.append(dict(
            context="\n".join([speaker, *verse[i - 3:i]]) + "\n",
            choices=[choices[j] for j in order],
            label=int(np.argmax(order == 3)),
        ))  # fmt: skip
    return items


def last_word_items(docs: list[list], n: int, rng) -> list[dict]:
    pool = []
    for doc in docs:
        for speaker, verse in doc:
            for i, line in enumerate(verse):
                m = _LAST_WORD.match(line)
                if m:
                    pool.append((speaker, verse[max(0, i - 2) : i], m.group(1), m.group(2)))
    picks = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    return [
        dict(context="\n".join([sp, *before, head]), target=" " + word)
        for sp, before, head, word in (pool[p] for p in sorted(picks))
    ]


def ppl_items(docs: list[list], n: int, chars: int = 1500) -> list[dict]:
    passages = []
    for doc in docs:
        text = ""
        for speaker, verse in doc:
            text += "\n".join([speaker, *verse]) + "\n\n"
            if len(text) >= chars:
                passages.append(dict(text=text.rstrip("\n") + "\n"))
                text = ""
    step = max(1, len(passages) // n)
    return passages[::step][:n]


def build(val_fraction: float = 0.05, seed: int = 0) -> dict:
    files = corpora.corpus_files("shakespeare")
    held_out = corpora.split_documents("shakespeare", files, val_fraction, None)["validation"]
    texts = list(held_out())
    docs = [speeches(t) for t in texts]
    rng = np.random.default_rng(seed)
    tasks = {
        "next_line": next_line_items(docs, SIZES["next_line"], rng),
        "last_word": last_word_items(docs, SIZES["last_word"], rng),
        "ppl": ppl_items(docs, SIZES["ppl"]),
    }
    (PACK / "data").mkdir(parents=True, exist_ok=True)
    for name, items in tasks.items():
        with open(PACK / "data" / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in items)
    names = [f.name for f in files if corpora._unit_hash(f.name) < val_fraction]
    pack = dict(
        corpus="shakespeare", val_fraction=val_fraction, seed=seed,
        sources={n: hashlib.sha256((corpora.cache_root() / "corpora" / "shakespeare" / n)
                                   .read_bytes()).hexdigest() for n in names},
        items={k: len(v) for k, v in tasks.items()},
    )  # fmt: skip
    (PACK / "pack.json").write_text(json.dumps(pack, indent=2) + "\n")
    return pack


if __name__ == "__main__":
    args = dict(a.removeprefix("--").split("=", 1) for a in sys.argv[1:])
    print(json.dumps(build(float(args.get("val_fraction", 0.05)), int(args.get("seed", 0)))))
