"""Prints a hash of the compiled small MoLE-4E train step of the checkout at argv[1], with names
and source locations removed (two revisions compile the same program iff the hashes agree).

    python hlo.py /path/to/checkout
"""

import hashlib
import os
import re
import sys

root = sys.argv[1]
sys.path.insert(0, root)
os.chdir(root)

from configs import mole  # noqa: E402
from mole_jax import data, trainer  # noqa: E402

cfg = mole.get_config("size=small,experts=4")
tr = trainer.setup(cfg)
td = data.prepare(cfg)
b = data.train_batch(td.train, cfg.seed, 0, cfg.train.batch_size, cfg.data.seq_len)
txt = tr.step_fn.lower(tr.abstract_state, *tr.put_batch(b)).compile().as_text()
txt = re.sub(r", metadata=\{[^}]*\}", "", txt)
txt = re.sub(r"%[\w.\-]+", "%x", txt)
lines = sorted(x.strip() for x in txt.splitlines() if x.strip())
lines = [x for x in lines if not re.match(r'^\d+ [{"]', x)]  # the stack-frame tables
print(root, len(lines), hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16])
