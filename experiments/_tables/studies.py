"""Renderers for docs/studies.md: the studies' tables, computed from the `sweep.json` each sweep
wrote under experiments/results/studies/<study>/ (or taken from its `results.md`), so that no
number on the page is copied by hand.

    study_tables NAME           results.md's tables, then the study's report(rows) recomputed
    study_report NAME           the study's report(rows), recomputed from sweep.json's rows with
                                the study file as it is now (descriptive, exploratory)
    seed_groups NAME COLUMN...  one row per seed group: seeds, then the COLUMNs (see COLUMNS)
    zero_shot_summary NAME      loss and task scores per model and engine, over seeds
    query_bn_summary NAME       loss, expert usage and unevenness per pool and query-BN setting
    isoflop_grid NAME BUDGET    one budget's loss per kind and width, and dense's steps
"""

from __future__ import annotations

import json
import re

import numpy as np
from _tables import RESULTS, markdown, renderer

# Row labels of the condensed tables, by study and seed group (else the group's own name).
LABELS = {
    "num_experts_3seeds": {f"mole-{e}e": f"MoLE-{e}E" for e in (2, 4, 8, 16, 32)},
    "aux_losses": {
        "lm-only": "LM loss only",
        "lb": "+ load balance (0.01)",
        "lb-z": "+ load balance + z (0.001)",
    },
    "expert_width": {"width-1d": "D_r = D", "width-4d": "D_r = 4D", "width-16d": "D_r = 16D"},
    "structure": {
        "moe-10e-top2": "MoE-10E top-2",
        "moe-10e-all": "all 10 experts active",
        "shared-4e-hidden": "1 shared + 4 routed (2× wide), hidden input",
        "mole-4e-embedding": "routed experts read the embedding (MoLE)",
    },
    "peer_experts": {f"peer-{n}x{n}": f"PEER N = {n}²" for n in (16, 32, 64, 128)},
    "peer_granularity": {
        f"hk-{h * k}": f"{h} × {k} = {h * k}"
        for h, k in ((2, 16), (4, 16), (8, 16), (8, 32), (16, 32))
    },
    "zero_shot": {"moe-10e": "MoE-10E", "mole-4e": "MoLE-4E"},
}
KINDS = {"dense": "dense", "moe": "MoE top-2", "moe-ec": "MoE expert choice", "pkm": "PKM",
         "peer": "PEER"}  # fmt: skip


def _sweep(name: str) -> dict:
    return json.loads((RESULTS / "studies" / name / "sweep.json").read_text())


def _groups(rows: list[dict]) -> dict[str, list[dict]]:
    """Finished rows by seed group (a run planned with `seeds`), else by name; in sweep order."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r.get("group") or r["name"], []).append(r)
    return out


def _ms(values: list[float], digits: int) -> str:
    """'mean ± sample std' of values (the mean alone for one value)."""
    v = np.asarray(values, np.float64)
    return f"{v.mean():.{digits}f}" + (f" ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else "")


def _millions(rows: list[dict], key: str) -> str:
    """A count every row of the group shares, in millions."""
    values = {r[key] for r in rows}
    assert len(values) == 1, f"{key} differs within a group: {values}"
    return f"{values.pop() / 1e6:.2f} M"


def _eval_names(rows: list[dict]) -> list[str]:
    """The evals that export a LUT (not the trained model's own loss again)."""
    return list(dict.fromkeys(n for r in rows for n, e in r["evals"].items() if "lut_dtype" in e))


def _eval_losses(rs: list[dict], name: str) -> str:
    got = [r["evals"][name]["loss"] for r in rs if name in r["evals"]]
    return _ms(got, 4) if got else "-"


def _gap(rs: list[dict], names: list[str]) -> str:
    got = [abs(r["evals"][n]["loss"] - r["val_loss"]) for r in rs for n in names if n in r["evals"]]
    return f"{max(got):.1e}" if got else "-"


def _bytes(rs: list[dict], names: list[str]) -> str:
    got = {r["evals"][n]["bytes_per_token"] for r in rs for n in names if n in r["evals"]}
    return ", ".join(f"{b:,}" for b in sorted(got)) or "-"


# column name -> (its header, or None for one column per LUT eval; its cell from a group's rows
# and the study's LUT eval names)
COLUMNS = {
    "config": ("config", lambda rs, ev: f"`{rs[0]['config']}`"),
    "params": ("params in training", lambda rs, ev: _millions(rs, "params_total")),
    "active": ("active / token", lambda rs, ev: _millions(rs, "params_active_per_token")),
    "val": ("val loss (mean ± sample std)", lambda rs, ev: _ms([r["val_loss"] for r in rs], 4)),
    "eval": (None, None),
    "gap": ("largest LUT − trained", lambda rs, ev: _gap(rs, ev)),
    "bytes": ("LUT bytes / token", lambda rs, ev: _bytes(rs, ev)),
}


def report(name: str) -> str:
    """The study's report(rows) on the sweep's rows, with the study file as it is now (the
    report a sweep stored may carry verdicts the file no longer issues)."""
    from _tables.verdicts import study_module

    out = _sweep(name)
    assert out["complete"], f"{name}: incomplete sweep"
    module = study_module(out["study"].partition(":")[0])
    return module.report(out["rows"]) if hasattr(module, "report") else ""


@renderer("study_tables")
def study_tables(name: str) -> str:
    """experiments/results/studies/<name>/results.md's tables (the runs', the one over seeds) as
    the sweep wrote them (the question is on the page), then the study's report recomputed."""
    text = (RESULTS / "studies" / name / "results.md").read_text()
    lines = text[text.index("\n| ") + 1 :].split("\n")
    last = max(i for i, line in enumerate(lines) if line.startswith("|"))
    return "\n".join(lines[: last + 1]) + "\n\n" + report(name)


@renderer("study_report")
def study_report(name: str) -> str:
    """The study's report(rows), recomputed (descriptive; the verdicts are study_verdicts')."""
    return report(name)


@renderer("seed_groups")
def seed_groups(name: str, *columns: str) -> str:
    """One row per seed group of the study: its label, its seeds, then each of `columns` (keys
    of COLUMNS; `eval` is one column per LUT eval, its loss's mean ± std)."""
    groups = _groups(_sweep(name)["rows"])
    evals = _eval_names([r for rs in groups.values() for r in rs])
    header, cells = ["runs", "seeds"], []
    for c in columns:
        head, cell = COLUMNS[c]
        if head is None:  # one column per LUT eval
            header += evals
            cells += [lambda rs, ev, n=n: _eval_losses(rs, n) for n in evals]
        else:
            header.append(head)
            cells.append(cell)
    labels = LABELS.get(name, {})
    rows = [[labels.get(g, g), len(rs)] + [cell(rs, evals) for cell in cells]
            for g, rs in groups.items()]  # fmt: skip
    return markdown(header, rows)


def _metric(metrics: dict) -> str:
    """The metric a task is read by (as the sweep's report reads it): accuracy, else perplexity."""
    return next(m for m in ("acc", "word_perplexity", "perplexity") if m in metrics)


@renderer("zero_shot_summary")
def zero_shot_summary(name: str) -> str:
    """Per model and engine (in memory, then each offloaded LUT that was scored on the tasks):
    validation loss, each task's score and the LUT bytes read per token, mean ± std over seeds."""
    groups = _groups(_sweep(name)["rows"])
    first = next(iter(groups.values()))[0]["tasks"]["model"]["tasks"]
    tasks = [(t, _metric(m)) for t, m in first.items()]
    header = ["model", "engine", "seeds", "val loss"]
    header += [f"{t.removeprefix('mole_')} {m.replace('_', ' ')}" for t, m in tasks]
    rows = []
    for g, rs in groups.items():
        for engine in rs[0]["tasks"]:
            rec = [r["tasks"][engine] for r in rs]
            loss = [r["val_loss"] if engine == "model" else r["evals"][engine]["loss"] for r in rs]
            cells = [LABELS["zero_shot"].get(g, g), "in memory" if engine == "model" else engine]
            cells += [len(rs), _ms(loss, 4)]
            cells += [_ms([x["tasks"][t][m] for x in rec], 3 if m == "acc" else 0)
                      for t, m in tasks]  # fmt: skip
            read = np.mean([x.get("bytes_read_per_token", 0) for x in rec])
            rows.append(cells + [f"{read:.0f}"])
    return markdown(header + ["bytes read / token"], rows)


@renderer("query_bn_summary")
def query_bn_summary(name: str) -> str:
    """Per pool size and query-BN setting: validation loss over seeds, and the share of experts
    used and the router mass's unevenness over the validation set (mean over layers and seeds)."""
    rows = []
    for g, rs in _groups(_sweep(name)["rows"]).items():
        keys, bn = re.fullmatch(r"n(\d+)-bn-(on|off)", g).groups()

        def mean(prefix, rs=rs):
            return np.mean([v for r in rs for k, v in r["evals"]["eval"].items()
                            if k.startswith(prefix)])  # fmt: skip

        rows.append([f"{keys}²", bn, len(rs), _ms([r["val_loss"] for r in rs], 4),
                     f"{mean('usage/'):.3f}", f"{mean('unevenness/'):.3f}"])  # fmt: skip
    return markdown(["N", "query BN", "seeds", "val loss", "usage", "unevenness"], rows)


def _parse_isoflop(run: str) -> tuple[str, str, float]:
    """(kind, budget, width) of an isoflop run `<kind>-<budget>-x<width>[-s<seed>]`."""
    kind, budget, width = re.sub(r"-s\d+$", "", run).rsplit("-", 2)
    return kind, budget, float(width[1:])


@renderer("isoflop_grid")
def isoflop_grid(name: str, budget: str) -> str:
    """One training-FLOP budget of an isoflop sweep: each kind's validation loss at each width
    (mean ± sample std where the width has several seeds), then dense's steps and active
    parameters per token at each width."""
    want = f"{float(budget):.1e}".replace("+", "")
    cells: dict[tuple[str, float], list[dict]] = {}
    for r in _sweep(name)["rows"]:
        kind, b, width = _parse_isoflop(r["name"])
        if b == want:
            cells.setdefault((kind, width), []).append(r)
    widths = sorted({w for _, w in cells})
    rows = [[label] + [_ms([r["val_loss"] for r in cells[(kind, w)]], 4) for w in widths]
            for kind, label in KINDS.items()]  # fmt: skip
    dense = [cells[("dense", w)][0] for w in widths]
    steps = [f"{r['steps']} / {r['params_active_per_token'] / 1e6:.2f} M" for r in dense]
    rows.append(["dense: steps / active params", *steps])
    return markdown([f"budget {budget}"] + [f"x{w:g}" for w in widths], rows)
