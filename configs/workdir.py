"""A run's own config, read from its workdir's config.json (what `train` wrote), to vary it:

python launch.py train --workdir=runs/m --config.train.steps=400

(`launch.py` passes `--config=configs/workdir.py:<workdir>` when overrides come without a
`--config`; it may also be given explicitly, e.g. to start a new run like an old one.)
"""

from mole_jax.errors import UserError
from mole_jax.workdir import Workdir


def get_config(arg=None):
    if not arg:
        raise UserError("configs/workdir.py needs the workdir: --config=configs/workdir.py:W")
    wd = Workdir(arg)
    if not wd.config_path.exists():
        raise UserError(f"{arg} holds no config.json yet: pass --config=configs/<kind>.py")
    cfg = wd.editable_config()
    cfg.lock()
    return cfg
