import sys, re, hashlib, os
root = sys.argv[1]; sys.path.insert(0, root); os.chdir(root)
import jax
from configs import mole
from mole_jax import data, trainer
cfg = mole.get_config("size=small,experts=4")
tr = trainer.setup(cfg)
td = data.prepare(cfg)
b = data.train_batch(td.train, cfg.seed, 0, cfg.train.batch_size, cfg.data.seq_len)
txt = tr.step_fn.lower(tr.abstract_state, *tr.put_batch(b)).compile().as_text()
txt = re.sub(r", metadata=\{[^}]*\}", "", txt)
txt = re.sub(r"%[\w.\-]+", "%x", txt)
lines = sorted(l.strip() for l in txt.splitlines() if l.strip())
print(root, len(lines), hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]); open("/tmp/hlo_" + root.strip("/").replace("/", "_") + ".txt", "w").write("\n".join(lines))
