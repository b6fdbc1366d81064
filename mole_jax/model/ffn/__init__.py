"""FFN kinds. `KINDS` is the only place that knows them all.

Each kind is a module with
    Settings            a frozen dataclass of its `model.ffn.<kind>` fields (dense: none)
    FORMS               the model forms it can be built in ('train' always; see model.FORMS)
    Layer(m, layer_idx, *, form, rngs)   the FFN protocol of `base.py`
    validate(m)         one ConfigError line naming a bad `model.ffn.<kind>` field
    account(m)          its per-layer parameter and FLOP numbers (accounting.py)
    causal(settings)    (optional) False where a setting makes outputs depend on later tokens
    Router(m, rngs)     (optional) a model-level module run once before the blocks: (ids, pos,
                        kv, index) -> (routes, kv); its routes reach every block as `ctx.routes`
    new_router_cache(m, batch, length, dtype), account_model(m, seq)   (with a Router)
Adding a kind: write `ffn/<kind>.py` with those names and add one line to KINDS.
"""

from __future__ import annotations

from flax import nnx

from mole_jax.errors import ConfigError
from mole_jax.model.ffn import dense, moe, mole, peer, pkm, pregated

KINDS = {
    "dense": dense,
    "moe": moe,
    "peer": peer,
    "pkm": pkm,
    "mole": mole,
    "pregated": pregated,
}


def layer_indices(spec: str, n_layers: int) -> tuple[int, ...]:
    """Which blocks get the configured FFN kind: 'all', 'none', 'middle', 'every_N' or '0,3,5'."""
    spec = str(spec).strip()
    if spec == "all":
        return tuple(range(n_layers))
    if spec == "none":
        return ()
    if spec == "middle":
        return (n_layers // 2,)
    if spec.startswith("every_"):
        step = spec.removeprefix("every_")
        if not step.isdigit() or int(step) < 1:
            raise ConfigError(f"model.ffn.layers='{spec}': every_N needs a positive integer N")
        return tuple(range(int(step) - 1, n_layers, int(step)))
    try:
        idx = tuple(sorted({int(s) for s in spec.split(",") if s.strip()}))
    except ValueError:
        raise ConfigError(
            f"model.ffn.layers='{spec}' is not all, none, middle, every_N or a list like '0,3'"
        ) from None
    bad = [i for i in idx if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(
            f"model.ffn.layers={spec!r} names blocks {bad}; valid are 0..{n_layers - 1}"
        )
    return idx


def router_module(kind: str):
    """The kind's module when it has a model-level Router, else None."""
    return KINDS[kind] if hasattr(KINDS[kind], "Router") else None


def build_ffn(m, layer_idx: int, *, form: str, rngs: nnx.Rngs):
    """The FFN of block `layer_idx` of the typed model config `m`, in `form`."""
    return KINDS[m.kind_of_layer(layer_idx)].Layer(m, layer_idx, form=form, rngs=rngs)
