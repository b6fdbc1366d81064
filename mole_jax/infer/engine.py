"""Engines: every way of running a trained workdir, behind one protocol and one factory.

    experts      the training-form model, all parameters in memory (any FFN kind)
    lut_memory   MoLE's LUT form with the whole LUT in device memory     (offload/lut.py)
    offload      MoLE's LUT form, rows read from the tensorstore LUT     (offload/lut.py)
    moe_offload  a MoE's resident weights; experts read when routed     (offload/moe.py)
    lookahead    a pre-gated model; every routed expert read before its block (offload/pregated.py)

Every engine composes the backbone's own pieces (`model.forward`, `Block.attend`, MoE
`route` / `apply_experts`); none copies the forward pass. `eval`, `generate`, the benchmarks and
the lm-eval adapter take an `Engine` and never ask which one they hold.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from mole_jax.data.dedup import check_ids
from mole_jax.errors import UserError
from mole_jax.model.backbone import new_cache
from mole_jax.model.config import model_config
from mole_jax.train.checkpoint import restore_model
from mole_jax.train.losses import cross_entropy
from mole_jax.workdir import Workdir, as_workdir

# mode -> (module, class) of its engine; imported when built.
MODES = {
    "experts": ("mole_jax.infer.engine", "InMemoryEngine"),
    "lut_memory": ("mole_jax.infer.offload.lut", "LutEngine"),
    "offload": ("mole_jax.infer.offload.lut", "LutEngine"),
    "moe_offload": ("mole_jax.infer.offload.moe", "MoeOffloadEngine"),
    "lookahead": ("mole_jax.infer.offload.pregated", "LookaheadEngine"),
}


class Engine(Protocol):
    cfg: Any  # the run's resolved config (frozen)
    mode: str
    step: int  # the checkpoint step it runs
    info: dict  # static facts for reports: lut_dtype, bytes_per_token, ...

    def prepare(self, ids_BxL) -> Any:
        """Host work for a forward call on `ids_BxL` that may run ahead of it, in another
        thread (reading LUT rows); pass the result to `forward` / `loss`."""

    def forward(self, ids_BxL, cache=None, prepared=None) -> tuple[jax.Array, Any]:
        """(float32 logits [B, L, V], advanced cache). With `cache` (from `init_cache`) the
        tokens are appended at the cache's position."""

    def loss(self, batch_BxL1, prepared=None) -> float:
        """Mean next-token cross-entropy of a batch of windows [B, L+1]."""

    def init_cache(self, batch: int, length: int) -> Any: ...

    def stats(self) -> dict:
        """Storage counters since the last reset (bytes_read, cache_hit_rate, ...); {} for an
        engine that reads nothing."""

    def reset_stats(self) -> None:
        """Zeroes the counters and empties the engine's caches: the next call starts cold."""

    def resident_bytes(self) -> int:
        """Bytes of parameters (and tables or cached experts) held in device memory."""


class BaseEngine:
    """What engines share: the workdir's config, id checks, the loss, the KV cache."""

    info: dict = {}

    def __init__(self, wd: Workdir, mode: str):
        self.workdir, self.mode = wd, mode
        self.cfg, self.model_config = wd.config, model_config(wd.config)

    def check(self, ids_BxL) -> np.ndarray:
        ids = np.asarray(ids_BxL, np.int32)
        check_ids(ids, self.model_config.vocab_size)
        return ids

    def prepare(self, ids_BxL):
        return None

    def loss(self, batch_BxL1, prepared=None) -> float:
        batch = np.asarray(batch_BxL1)
        logits, _ = self.forward(batch[:, :-1], prepared=prepared)
        return float(cross_entropy(logits, jnp.asarray(batch[:, 1:])))

    def init_cache(self, batch: int, length: int):
        require_causal(self.model_config, "decoding with a KV cache")
        return new_cache(self.model_config, batch, length)

    def stats(self) -> dict:
        return {}

    def reset_stats(self) -> None:
        pass


def require_causal(m, what: str) -> None:
    """One UserError line when the model's outputs depend on later tokens (expert-choice MoE)."""
    if not m.causal:
        raise UserError(
            f"{what} needs a causal model; this one routes its MoE by expert choice, so a "
            "token's output depends on the later tokens of its sequence (train and eval only)"
        )


def tree_bytes(*trees) -> int:
    return int(sum(x.size * x.dtype.itemsize for t in trees for x in jax.tree.leaves(t)))


class InMemoryEngine(BaseEngine):
    """The training-form model with every parameter in device memory; one jitted forward."""

    def __init__(self, wd: Workdir, mode: str = "experts", step: int | None = None):
        super().__init__(wd, mode)
        model = restore_model(wd, self.model_config, "train", step)
        self.graphdef, self.params, self.rest, self.step = (
            model.graphdef,
            model.params,
            model.rest,
            model.step,
        )
        self._run = jax.jit(_run(model.graphdef))
        self._mass: dict[int, np.ndarray] = {}

    def forward(self, ids_BxL, cache=None, prepared=None):
        logits, cache, masses = self._run(self.params, self.rest, self.check(ids_BxL), cache)
        for i, mass in masses.items():  # product-key layers: router mass per slot, summed
            self._mass[i] = mass if i not in self._mass else self._mass[i] + mass  # on device
        return logits, cache

    def stats(self) -> dict:
        """Product-key layers (PEER, PKM): usage and unevenness over every token since the last
        reset — over a whole evaluation, as the PEER paper measures them."""
        from mole_jax.model.ffn.peer import usage_from_mass

        out = {}
        for i, mass in sorted(self._mass.items()):
            usage, unevenness = usage_from_mass(np.asarray(mass, np.float64))
            out[f"usage/l{i}"], out[f"unevenness/l{i}"] = float(usage), float(unevenness)
        return out

    def reset_stats(self) -> None:
        self._mass = {}

    def resident_bytes(self) -> int:
        return tree_bytes(self.params)


def _run(graphdef):
    from flax import nnx

    def run(params, rest, ids, cache):
        out = nnx.merge(graphdef, params, rest)(ids, cache=cache)
        masses = {i: a["mass"] for i, a in out.aux["per_layer"].items() if "mass" in a}
        return out.logits_BxLxV, out.cache, masses

    return run


def build_engine(workdir, mode: str = "experts", step: int | None = None, **options) -> Engine:
    """The engine of `mode` (MODES) over a workdir's checkpoint `step` (default: newest).

    options go to the engine: `store` (the store directory under the workdir), `cache_rows` and
    `verify` (LUT modes), `capacity`, `prefetch` and `record` (moe_offload)."""
    if mode not in MODES:
        raise UserError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    module, name = MODES[mode]
    cls = getattr(importlib.import_module(module), name)
    return cls(as_workdir(workdir), mode, step, **options)
