"""Preparing a corpus: peak memory and time of tokenisation, against its size.

Question: does preparing a corpus (BPE training, tokenising both splits into the on-disk token
store) need memory that grows with the corpus? Expected: no; the peak stays flat as the corpus
grows, where holding the text and the tokens in Python lists grew with it.

    python experiments/bench_data.py [--sizes=50,200] [--repos=.,/path/to/other/checkout]

Method: a generated corpus of English-like sentences in 1 MB files (`--sizes` MB); each
checkout in `--repos` prepares it in a fresh subprocess with a fresh cache (`pipeline.prepare` of
configs/dense.py:size=tiny with data.vocab_size=8192), which reports its peak RSS
(getrusage ru_maxrss) and wall time. Checkouts run one after another, sizes in order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import _paths  # noqa: F401
import numpy as np
from absl import app, flags

flags.DEFINE_list("sizes", ["50", "200"], "Corpus sizes in MB.")
flags.DEFINE_list("repos", ["."], "Checkouts whose mole_jax prepares the corpus.")
flags.DEFINE_string("json", "experiments/results/bench_data.json", "Write the result here.")
FLAGS = flags.FLAGS

WORDS = (
    "the a noble gentle king queen lord lady knight crown sword castle river night day heart "
    "moon star loves fears seeks keeps leaves finds holds calls sees hears bold fair dark bright "
    "sweet grave proud young old wise"
).split()

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from configs import dense
try:
    from mole_jax.data import pipeline
except ImportError:  # a checkout from before the packages by layer
    from mole_jax import data as pipeline
cfg = dense.get_config("size=tiny")
cfg.data.corpus = "files:{corpus}/*.txt"
cfg.data.cache_dir = {cache!r}
t0 = time.perf_counter()
td = pipeline.prepare(cfg)
print(json.dumps(dict(seconds=time.perf_counter() - t0,
                      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      train_tokens=int(td.train.size), val_tokens=int(td.val.size))))
"""


def write_corpus(directory: Path, megabytes: int) -> int:
    rng = np.random.default_rng(0)
    words = np.array(WORDS)
    total = 0
    for i in range(megabytes):
        idx = rng.integers(0, len(words), (20_000, 9))
        text = "\n".join(" ".join(r) + f" {n}." for r, n in zip(words[idx], idx[:, 0], strict=True))
        (directory / f"part{i:04d}.txt").write_text(text)
        total += len(text)
    return total


def measure(repo: str, corpus: Path) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        code = CHILD.format(repo=os.path.abspath(repo), corpus=corpus, cache=cache)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-2000:])
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main(_):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mb in map(int, FLAGS.sizes):
            corpus = Path(tmp) / f"c{mb}"
            corpus.mkdir()
            size = write_corpus(corpus, mb)
            for repo in FLAGS.repos:
                r = dict(measure(repo, corpus), repo=repo, corpus_mb=size / 2**20)
                print(
                    f"{repo:<30} {r['corpus_mb']:6.0f} MB corpus: peak RSS {r['peak_rss_mb']:7.0f} "
                    f"MB, {r['seconds']:6.1f} s, {r['train_tokens']:,} train tokens",
                    flush=True,
                )
                rows.append(r)
    if FLAGS.json:
        Path(FLAGS.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    app.run(main)
