"""Bytes per device of a training step on a mesh of any size, without the devices.

    params      the float32 parameters as the rules table shards them (`sharding.RULES`)
    grads       one float32 gradient per parameter, sharded alike
    opt_state   AdamW's two float32 moments, sharded alike
    activations what the backward pass keeps of one micro-batch, plus the peak of one layer, the
                loss's logits and (MoLE) the step's token tables; see `activation_bytes`
Parameters come from the model built abstractly (`nnx.eval_shape`) and their logical axes; the
activation figure is an estimate in closed form, checked against XLA's own `memory_analysis()`
of the compiled step in the tests.
"""

from __future__ import annotations

import math
import types

import jax
from flax import nnx

from mole_jax.model import flash
from mole_jax.model.backbone import abstract_model
from mole_jax.model.config import model_config
from mole_jax.model.ffn.moe import resolve_grouped
from mole_jax.parallel.sharding import BATCH_AXES, MESH_AXES, logical_spec


def _split(spec_entry, sizes: dict[str, int]) -> int:
    if spec_entry is None:
        return 1
    axes = spec_entry if isinstance(spec_entry, tuple) else (spec_entry,)
    return math.prod(sizes[a] for a in axes)


def param_bytes(m, sizes: dict[str, int]) -> int:
    """float32 parameter bytes one device holds when `sizes` ({mesh axis: size}) shards them."""
    mesh = types.SimpleNamespace(shape=sizes)
    state = nnx.state(abstract_model(m), nnx.Param)
    total = 0
    for var in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        names = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
        spec = logical_spec(names, mesh)
        shard = [math.ceil(n / _split(s, sizes)) for n, s in zip(var.shape, spec, strict=False)]
        total += math.prod(shard) * 4
    return total


def activation_bytes(cfg, sizes: dict[str, int], backend: str = "cpu") -> int:
    """What the backward pass holds for one micro-batch on one device (an estimate in closed
    form; tests/test_memory.py checks it against XLA's memory analysis).

    T tokens on the device, c bytes per compute value, per layer: 13 T D c (the residual
    stream, both norms' inputs and outputs, q k v, the rotated q k, attention's output and
    projection) and 3 B (H/tp) L^2 4 (float32 scores, probabilities and their cast; none where
    attention is a flash kernel, `model.flash`), plus the
    FFN's own (`_ffn_activations`), plus the layer's weight gradient at full size (it is
    reduce-scattered after the backward pass). remat='full' keeps only each layer's input
    (T D c) and one layer's worth for the recomputation. Then the loss's float32 logits and
    their gradient (2 B chunk V 4), the full-size gradients of the embedding and the head
    (2 V D 4) and, for MoLE, the step's token tables.
    """
    m = model_config(cfg)
    t = cfg.train
    b = t.batch_size // t.microbatches // math.prod(sizes[a] for a in BATCH_AXES)
    seq, d, v, tp = cfg.data.seq_len, m.d_model, m.vocab_size, sizes["tensor"]
    tokens, c = b * seq, (2 if m.dtype == "bfloat16" else 4)
    scores = 3 * b * (m.n_heads / tp) * seq * seq * 4  # none kept by a flash kernel
    attn = 13 * tokens * d * c + (
        0 if flash.resolve(m.attention, seq, backend) == "flash" else scores
    )
    per_layer = [
        attn + _ffn_activations(m, i, tokens, c, sizes, backend) for i in range(m.n_layers)
    ]
    grads = sum(_layer_param_bytes(m, i) for i in range(m.n_layers))
    if m.remat == "none":
        layers = sum(per_layer)
    else:
        layers = m.n_layers * tokens * d * c + max(per_layer)
    chunk = t.loss_chunk or seq
    logits = 2 * b * chunk * math.ceil(v / tp) * 4 + 2 * v * d * 4
    return int(layers + grads + logits + _table_bytes(m, cfg, sizes))


def _layer_param_bytes(m, layer: int) -> int:
    from mole_jax.model import ffn

    kind = m.kind_of_layer(layer)
    return 4 * (4 * m.d_model**2 + 2 * m.d_model + ffn.KINDS[kind].account(m)["params"])


def _ffn_activations(m, layer: int, tokens: int, c: int, sizes: dict[str, int], backend: str):
    """The FFN's activations in one layer: dense 3 T F c (hidden before and after the activation
    and its gradient); MoE the routed assignments of its expert group (padded to tiles by the
    blocked grouped matmul, with the tiles' gathered weights and their gradients), MoLE the
    shared FFN plus E rows per position and their gradient, PEER the gathered rows."""
    kind, tp, d = m.kind_of_layer(layer), sizes["tensor"], m.d_model
    dense = 3 * tokens * (m.d_ff / tp) * c
    if kind in ("moe", "pregated"):  # pre-gated: the same dropless dispatch (router: small)
        return _moe_activations(m, tokens, c, sizes, backend)
    if kind == "mole":
        s = m.ffn
        return dense + tokens * s.experts * (2 * d * c + 3 * 4)
    if kind == "peer":
        s = m.ffn
        return tokens * s.heads * s.topk * (2 * d + 2) * c + tokens * s.heads * s.d_key * 4
    if kind == "pkm":  # the gathered values, the scores
        s = m.ffn
        return tokens * s.heads * s.topk * (d + 1) * c + tokens * s.heads * s.d_key * 4
    return dense


def _moe_activations(m, tokens: int, c: int, sizes: dict[str, int], backend: str) -> float:
    s, d, tp, ep = m.ffn, m.d_model, sizes["tensor"], sizes["expert"]
    f = s.d_expert / tp
    assigned = tokens * ep * s.topk  # the expert group's tokens are gathered (expert_parallel.py)
    groups = s.experts // ep + (ep > 1)  # the local experts, and the dummy group
    rows, tile_weights = assigned, 0.0
    grouped = resolve_grouped(s.grouped, backend)
    if grouped == "blocked":
        tile = min(s.tile, 1 << (assigned // groups).bit_length())
        tiles = -(-(assigned + groups * (tile - 1)) // tile)
        rows, tile_weights = tiles * tile, 2 * tiles * 2 * d * f * c
    routed = rows * (2 * d + 2 * f) * c + assigned * 2 * d * c + tile_weights
    always_on = getattr(s, "shared_d_ff", None) or getattr(s, "permanent", 0)  # MoE / pre-gated
    shared = 3 * tokens * always_on / tp * c
    return routed + shared + tokens * s.experts * 4 * 3


def _table_bytes(m, cfg, sizes: dict[str, int]) -> float:
    """MoLE's token tables: each device holds the table of its own rows' distinct ids (at most
    the vocabulary, or the tokens it sees in a step, or in a micro-batch with
    train.token_tables='microbatch'), E x D per layer, with its gradient (and, per step, the
    gradient's accumulator over micro-batches), and the experts' hidden states (3 F_r: before and
    after the activation and the gradient) for the pull-back, of every layer, or of one at a time
    with remat."""
    if m.kind != "mole" or m.ffn.impl != "unique" or m.ffn.expert_input != "embedding":
        return 0.0
    t = cfg.train
    per_step = t.token_tables == "step"
    ways = math.prod(sizes[a] for a in BATCH_AXES)
    tokens = t.batch_size // ways * cfg.data.seq_len // (1 if per_step else t.microbatches)
    rows = min(m.vocab_size, tokens)
    c = 2 if m.dtype == "bfloat16" else 4
    e, layers = m.ffn.experts, len(m.ffn_layers)
    tables = (3 if per_step else 2) * rows * e * m.d_model * c
    hidden = 3 * rows * e * m.ffn.d_expert / sizes["tensor"] * c
    return layers * tables + (layers if m.remat == "none" else 1) * hidden


# The closed-form activations against the compiled programs: on GPU and TPU targets they are
# scaled by the factor that best fits the compiled peaks (least squares in log space) of the
# paper configurations of the model's FFN kind at the paper batch, "all" (every kind) for a kind
# not compiled. `python experiments/compile_plan.py --replan` fits them and writes
# experiments/results/plan_calibration.json with the plan's error before and after; a test checks
# these against it. Fitted on the configurations they are judged on: the error is in-sample.
CALIBRATION = {
    "gpu": {
        "dense": 0.524,
        "moe": 0.3578,
        "mole": 0.2678,
        "peer": 1.6417,
        "pregated": 0.5268,
        "all": 0.457,
    },
    "tpu": {
        "dense": 0.413,
        "moe": 0.3717,
        "mole": 0.1501,
        "peer": 0.7949,
        "pregated": 0.4552,
        "all": 0.3341,
    },
}


def calibration(backend: str, kind: str) -> float:
    """The activation factor of `kind` on `backend` (1 where nothing was compiled)."""
    factors = CALIBRATION.get(backend, {})
    return factors.get(kind, factors.get("all", 1.0))


def plan(cfg, sizes: dict[str, int], backend: str = "cpu", params: int | None = None,
         calibrated: bool = True) -> dict:  # fmt: skip
    """{'params', 'grads', 'opt_state', 'activations', 'total'}: bytes per device on `backend`
    ('cpu', 'gpu' or 'tpu'), the activations scaled by `calibration(backend, kind)` unless
    `calibrated` is False. `params`: the parameter bytes per device when already known (they do
    not depend on the batch)."""
    m = model_config(cfg)
    if params is None:
        params = param_bytes(m, sizes)
    out = dict(params=params, grads=params, opt_state=2 * params)
    scale = calibration(backend, m.kind) if calibrated else 1.0
    out["activations"] = int(scale * activation_bytes(cfg, sizes, backend))
    out["total"] = sum(out.values())
    return out


def mesh_sizes(mesh_cfg, n_devices: int | None = None) -> dict[str, int]:
    """{axis: size} of `cfg.mesh`, its -1 axis filled up to `n_devices` (default: as if 1)."""
    from mole_jax.parallel.sharding import mesh_shape

    fixed = math.prod(max(1, mesh_cfg[a]) for a in MESH_AXES)
    return mesh_shape(mesh_cfg, n_devices or fixed)


def fit(cfg, sizes: dict[str, int], budget: int, backend: str = "gpu") -> tuple[dict, int]:
    """(plan, micro-batches): the fewest gradient-accumulation steps (dividing the batch into
    parts each device can split) whose plan fits `budget` bytes per device; (the plan at the
    most micro-batches, 0) when none does."""
    import copy

    t = cfg.train
    ways = math.prod(sizes[a] for a in BATCH_AXES)
    options = [m for m in range(1, t.batch_size + 1) if (t.batch_size % m == 0
               and (t.batch_size // m) % ways == 0)]  # fmt: skip
    trial = copy.deepcopy(cfg)
    best, params = None, param_bytes(model_config(cfg), sizes)
    for m in options:
        trial.train.microbatches = m
        best = plan(trial, sizes, backend, params)
        if best["total"] <= budget:
            return best, m
    return best, 0
