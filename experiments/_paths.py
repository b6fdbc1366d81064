"""Lets scripts in experiments/ import `configs` and `mole_jax` when run as files from the repo, and
starts jax on this host's accelerators, else on the CPU alone (`mole_jax.platforms`)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from mole_jax import platforms  # noqa: E402

platforms.default_to_cpu()  # benchmarks import jax next
