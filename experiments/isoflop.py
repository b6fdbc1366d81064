r"""isoFLOP comparison of dense, MoE, PKM and PEER (the PEER paper's Fig. 1 / Table 1, CPU scale).

Question: at a fixed training-FLOP budget, which FFN kind reaches the lowest validation loss
when each is trained at its best model size? For each of two budgets and each kind, five
backbone widths are trained for steps = budget / (training FLOPs per step), and the minimum of
each kind's curve is reported.
Expected (PEER paper, Table 1): PEER < MoE < PKM < dense in perplexity at both budgets. The
paper's MoE routes by expert choice (`moe-ec`: not causal, see mole_jax/model/ffn/moe.py); the top-2
token-choice MoE (`moe`, the MoLE paper's baseline) is trained beside it.

    python launch.py sweep --config=experiments/isoflop.py:size=tiny --workdir=runs/isoflop

(the defaults: budgets 1e12 and 3e12, five widths, seeds 1 and 2 of the narrowest width, x0.5,
beside every width's seed 0; the shipped runs were made in two steps, seeds=1 first.)

Claims (`CLAIMS`): each step of the paper's order, PEER < MoE (expert choice) < PKM < dense, at
each budget, tested at the seeded width x0.5 (paired over its 3 seeds, Holm over the 6). The paper
compares each kind at its own best width; which width is best is read from the results, so that
comparison cannot be declared beforehand and the report gives it as exploratory (x0.5 itself was
seeded after every curve had bottomed there). Declared after the shipped runs
(experiments/results/studies/isoflop): post hoc for them. The claims follow the knobs: every
budget swept, at the first width of `seed_scales` (or of `scales`).

Report (exploratory): per budget, each kind's lowest mean loss over its widths (among those with
the most seeds) and the order of those means.

Cost: 5 kinds x 5 widths x (1e12 + 3e12) = 1e14 training FLOPs, about 42 tiny 600-step runs
(a 600-step tiny dense run is 2.4e12), and 1.4e14 with the x0.5 seeds (70 runs); at tiny the
smallest budget gives the widest models ~110 steps and the narrowest ~500-550.

Sizes (`scales`, default 0.5/0.75/1/1.5/2): the `size` backbone with d_model scaled by each
(rounded down to a multiple of the heads; d_ff = 4 d_model, heads kept), so that each curve's
minimum can sit inside the widths tried;
the FFN kinds keep their configs' own widths (MoE experts d_ff/2 of the base size, PKM/PEER
their key and pool sizes). Training FLOPs per token are `accounting.summarize`'s
`train_flops_per_token` (3x the forward).
"""

import itertools
import re

from experiments._study import by_group, knobs, mean, run
from mole_jax.config import apply_overrides, load_file
from mole_jax.sweeps.claims import Claim
from mole_jax.train import accounting

KINDS = {  # name: (configs/<kind>.py, its arguments)
    "dense": ("dense", {}),
    "moe": ("moe", dict(experts=8, topk=2)),
    "moe-ec": ("moe", dict(experts=8, topk=2, routing="expert_choice")),
    "pkm": ("pkm", dict(keys=32, heads=4, topk=16)),
    "peer": ("peer", dict(keys=32, heads=4, topk=16)),
}


BUDGETS, SEEDED = "1e12/3e12", "0.5"  # the defaults the claims are declared on

PAPER_ORDER = ("peer", "moe-ec", "pkm", "dense")  # Table 1: lowest loss first


def _group(kind: str, budget: float, scale: float) -> str:
    return f"{kind}-{budget:.1e}-x{scale}".replace("+", "")


def CLAIMS(c):  # a function of the study's knobs: its budgets and seeded width
    scale = (_floats(c.seed_scales) or _floats(c.scales))[0]
    return [
        Claim(_group(a, b, scale), _group(w, b, scale),
              source="PEER Table 1: PEER < MoE < PKM < dense in perplexity at each budget")
        for b in _floats(c.budgets)
        for a, w in itertools.pairwise(PAPER_ORDER)
    ]  # fmt: skip


def get_config(arg=None):
    return knobs(arg, size="tiny", budgets=BUDGETS, scales="0.5/0.75/1/1.5/2", seeds=3,
                 seed_scales=SEEDED)  # fmt: skip


def _floats(text) -> list[float]:
    return [float(x) for x in str(text).split("/") if x]


def _sized(c, kind: str, args: dict, scale: float) -> dict:
    r = run("x", kind, c, **args)
    base = load_file(r["config"])
    d = int(base.model.d_model * scale) // base.model.n_heads * base.model.n_heads
    r["set"] = {"model.d_model": d, "model.d_ff": 4 * d}
    return r


def get_sweep(c):
    """One run per budget x kind x width; with `seeds=k`, k - 1 more of each width in
    `seed_scales` (default every width) as `<name>-s1` ... (seed 0 is the unsuffixed run)."""
    c.unlock()
    c.steps = 0  # each run's steps follow from its budget
    c.lock()
    seeded = _floats(c.seed_scales) or _floats(c.scales)
    runs = []
    for budget in _floats(c.budgets):
        for name, (kind, args) in KINDS.items():
            for scale in _floats(c.scales):
                r = _sized(c, kind, args, scale)
                cfg = apply_overrides(load_file(r["config"]), dict(r["set"]))
                per_step = (accounting.summarize(cfg)["train_flops_per_token"]
                            * cfg.train.batch_size * cfg.data.seq_len)  # fmt: skip
                r["set"]["train.steps"] = max(1, int(budget // per_step))
                r["name"] = _group(name, budget, scale)
                runs.append(r)
                for i in range(1, c.seeds if scale in seeded else 1):
                    runs.append(dict(r, name=f"{r['name']}-s{i}", set=dict(r["set"], seed=i)))
    return runs


def _parse(name: str) -> tuple[str, str, str]:
    """(kind, budget, width) of a run name `<kind>-<budget>-x<width>[-s<seed>]`."""
    base = re.sub(r"-s\d+$", "", name)
    kind, budget, width = base.rsplit("-", 2)
    return kind, budget, width


def _grouped(rows) -> list[dict]:
    """The rows with `group` = the run name without its seed suffix (seed 0 has none)."""
    return [dict(r, group="-".join(_parse(r["name"]))) for r in rows]


def report(rows):
    rows = _grouped(rows)
    groups = by_group(rows)
    widths = [f"x{w}" for w in sorted({float(_parse(g)[2][1:]) for g in groups})]
    edge = lambda w: "*" if w in (widths[0], widths[-1]) else ""  # noqa: E731
    # budget -> kind -> its group of lowest mean loss among its widths with the most seeds
    best: dict[str, dict[str, str]] = {}
    for g in sorted(groups, key=lambda g: (-len(groups[g]), mean(groups[g]))):
        kind, budget, _ = _parse(g)
        best.setdefault(budget, {}).setdefault(kind, g)
    lines = []
    for budget, per_kind in best.items():
        order = sorted(per_kind, key=lambda k: mean(groups[per_kind[k]]))
        cells = ", ".join(
            f"{k} {mean(groups[g]):.4f} ({w}{edge(w)}, {len(groups[g])} seed(s))"
            for k in order
            for g in [per_kind[k]]
            for w in [_parse(g)[2]]
        )
        means = [k for k in order if k in PAPER_ORDER]
        lines.append(f"- budget {budget}: lowest mean loss per kind (at width; among the widths "
                     f"with the most seeds) {cells}")  # fmt: skip
        same = "the paper's" if means == list(PAPER_ORDER) else "not the paper's"
        lines.append(f"- budget {budget}: order of those means {' < '.join(means)} ({same} "
                     f"{' < '.join(PAPER_ORDER)}; no test)")  # fmt: skip
    lines.append(f"- *: the narrowest or widest width tried ({widths[0]}, {widths[-1]}): that "
                 "curve's minimum may lie beyond it")  # fmt: skip
    return "\n".join(lines)
