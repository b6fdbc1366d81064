"""Lets scripts in experiments/ import `configs` and `mole_jax` when run as files from the repo."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
