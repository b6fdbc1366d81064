"""`launch.py export --format=hf --to=DIR`: a workdir's model as a Hugging Face directory.

The directory (config.json, model.safetensors or shards with their index, tokenizer.json) is
what the reference code loads: the official MoLE modeling files for dense / MoE / MoLE, or
transformers' LlamaForCausalLM / MixtralForCausalLM (`architectures` names the class).
Tensors are float32, as mole_jax keeps its parameters, so `import` of the export gives the
workdir's parameters bit for bit. The directory is written
beside its destination and renamed into place: a killed export leaves no half directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np

from mole_jax.errors import UserError
from mole_jax.interop import families
from mole_jax.interop.checkpoint_dir import write
from mole_jax.model.config import model_config
from mole_jax.train.checkpoint import restore_model
from mole_jax.workdir import as_workdir


def export_hf(workdir, to, step: int | None = None, shard_bytes: int = 2**31) -> dict:
    """Writes the HF directory `to`; returns {'to', 'step', 'architecture', 'files'}."""
    wd, to = as_workdir(workdir), Path(to)
    m = model_config(wd.config)
    config = families.hf_config(m)  # refuses kinds the family cannot express, before reading
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise UserError(f"{to} exists and is not an empty directory; export into a new one")
    wd.tokenizer()  # checked against checksums.json first: a damaged one is never handed on
    restored = restore_model(wd, m, step=step)
    params = jax.device_get(restored.params)
    tensors = {}
    for t in families.tensors(m):
        value = params
        for key in t.path:
            value = value[key]
        value = np.asarray(value if t.expert is None else value[t.expert], np.float32)
        if m.gated and t.path[-1] == "up" and t.expert is not None:  # [gate | up]: one half
            f = value.shape[-1] // 2
            value = value[..., t.offset : t.offset + f]
        tensors[t.hf] = np.ascontiguousarray(value.T if t.transpose else value)
    tmp = to.parent / f".{to.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = write(tmp, tensors, shard_bytes)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(wd.tokenizer_path, tmp / "tokenizer.json")
    if to.exists():
        to.rmdir()
    os.replace(tmp, to)
    return dict(
        to=str(to),
        step=restored.step,
        architecture=config["architectures"][0],
        files=[*files, "config.json", "tokenizer.json"],
    )
