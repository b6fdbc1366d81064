r"""Seed noise: the yardstick for the other studies' differences.

Question: how far apart are the validation losses of runs that differ only in the seed (the
initialisation and the order of the training batches)? It is the noise the other studies' tests
must see through (`mole_jax/sweeps/stats.py`: their minimum detectable effects grow with it).
Expected: a spread of a few hundredths of a nat or less at these step counts.

    python launch.py sweep --config=experiments/seeds.py:size=tiny,steps=600,kind=mole \
        --workdir=runs/seeds
"""

import numpy as np

from experiments._study import knobs, run, val

# A measurement (the spread of one model over seeds), no paper claim to test.
CLAIMS = []


def get_config(arg=None):
    return knobs(arg, size="tiny", steps=600, kind="mole", seeds=3)


def get_sweep(c):
    runs = []
    for seed in range(c.seeds):
        r = run(f"{c.kind}-seed{seed}", c.kind, c)
        r["set"]["seed"] = seed
        runs.append(r)
    return runs


def report(rows):
    losses = np.array(list(val(rows).values()))
    line = f"- validation loss over {len(losses)} seed(s): mean {losses.mean():.4f}"
    if len(losses) > 1:
        line += f", spread (max - min) {np.ptp(losses):.4f}, std {losses.std(ddof=1):.4f}"
    return line
