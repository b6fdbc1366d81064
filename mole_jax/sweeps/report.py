"""What a sweep prints and writes: the dry-run plan, `sweep.json`, `results.md`, `curves.png`."""

from __future__ import annotations

import json
import os

import numpy as np

from mole_jax.config import to_json, user_code
from mole_jax.errors import ConfigError
from mole_jax.files import write_text_atomic
from mole_jax.sweeps import claims
from mole_jax.sweeps.worker import finished_result


def _m(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} M"


def _overrides(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items()) or "-"


def plan_table(runs) -> str:
    """The runs a sweep would start, with their sizes from abstract evaluation (nothing trains)."""
    from mole_jax.train import accounting

    lines = [
        "| run | config | overrides | params in training | active / token | tokens | train FLOPs "
        "| evals |",
        "|" + "---|" * 8,
    ]
    for r in runs:
        s = accounting.summarize(r.cfg)
        t = r.cfg.train
        tokens = t.steps * t.batch_size * r.cfg.data.seq_len
        evals = ", ".join(e["name"] for e in r.spec["evals"]) or "-"
        if r.spec.get("tasks"):
            evals += f"; tasks {', '.join(r.spec['tasks'])}"
        lines.append(
            f"| {r.name} | {r.spec['config']} | {_overrides(r.spec['set'])} "
            f"| {_m(s['params_total'])} | {_m(s['params_active_per_token'])} | {tokens:,} "
            f"| {s['train_flops_per_token'] * tokens:.2e} | {evals} |"
        )
    return "\n".join(lines)


def _eval_cell(e: dict | None) -> str:
    if e is None:
        return "-"
    cell = f"{e['loss']:.4f}"
    if e.get("mode") == "offload":  # rows read from storage per token
        cell += f" ({e['bytes_per_token']:,} B/token)"
    return cell


def primary_metric(metrics: dict) -> str:
    """The metric a task is read by: accuracy, else word perplexity, else its first."""
    for m in ("acc", "word_perplexity", "perplexity"):
        if m in metrics:
            return m
    return next(k for k in metrics if not k.endswith("_stderr"))


def task_columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(engine name, task, metric) of every task score the rows hold, in first-seen order."""
    cols = {}
    for r in rows:
        for engine, rec in r.get("tasks", {}).items():
            for task, metrics in rec["tasks"].items():
                metric = primary_metric(metrics)
                if engine == "model" or metric == "acc":  # evals: accuracy only
                    cols[(engine, task, metric)] = None
    return list(cols)


def task_cell(row: dict, engine: str, task: str, metric: str) -> str:
    metrics = row.get("tasks", {}).get(engine, {}).get("tasks", {}).get(task)
    if not metrics or metric not in metrics:
        return "-"
    err = metrics.get(f"{metric}_stderr")
    big = metric != "acc"
    value = f"{metrics[metric]:.2f}" if big else f"{metrics[metric]:.3f}"
    return value if not isinstance(err, (int, float)) else value + f" ± {err:.{2 if big else 3}f}"


def _task_head(engine: str, task: str, metric: str) -> str:
    return f"{task.removeprefix('mole_')} {metric}" + ("" if engine == "model" else f" ({engine})")


def results_table(rows: list[dict]) -> str:
    names = list(dict.fromkeys(n for r in rows for n in r.get("evals", {})))
    tasks = task_columns(rows)
    head = ["run", "config", "overrides", "params in training", "active / token", "steps"]
    head += ["train loss", "val loss", *names, *(_task_head(*c) for c in tasks)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "val_loss" not in r:
            cells = [r["name"], r["config"], _overrides(r["set"]), r["status"]]
            cells += [""] * (len(head) - len(cells))
        else:
            cells = [r["name"], r["config"], _overrides(r["set"])]
            cells += [_m(r.get("params_total")), _m(r.get("params_active_per_token"))]
            cells += [str(r["steps"]), f"{r['loss']:.4f}", f"{r['val_loss']:.4f}"]
            cells += [_eval_cell(r["evals"].get(n)) for n in names]
            cells += [task_cell(r, *c) for c in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_std(values: list[float], digits: int) -> str:
    v = np.asarray(values, np.float64)
    std = f" ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else ""
    return f"{v.mean():.{digits}f}{std}"


def seed_table(rows: list[dict]) -> str:
    """Per group of seeds (runs planned with `seeds`): every number's mean ± std."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("group") and "val_loss" in r:
            groups.setdefault(r["group"], []).append(r)
    if not groups:
        return ""
    names = list(dict.fromkeys(n for rs in groups.values() for r in rs for n in r["evals"]))
    tasks = task_columns([r for rs in groups.values() for r in rs])
    head = ["runs", "seeds", "val loss", *names, *(_task_head(*c) for c in tasks)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group, rs in groups.items():
        cells = [group, str(len(rs)), _mean_std([r["val_loss"] for r in rs], 4)]
        for n in names:
            got = [r["evals"][n]["loss"] for r in rs if n in r["evals"]]
            cells.append(_mean_std(got, 4) if got else "-")
        for engine, task, metric in tasks:
            got = [r["tasks"][engine]["tasks"][task][metric] for r in rs
                   if task in r.get("tasks", {}).get(engine, {}).get("tasks", {})]  # fmt: skip
            cells.append(_mean_std(got, 3 if metric == "acc" else 2) if got else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(module, filename: str, study_cfg, workdir: str, runs, status: dict) -> dict:
    """Gathers the runs' results into sweep.json, results.md and curves.png; returns sweep.json."""
    rows = []
    for run in runs:
        # None for a failed run (its stale result is removed when it starts)
        row = finished_result(run.dir, run.spec)
        if row is not None:
            row.pop("spec")
        else:
            row = dict(name=run.name, config=run.spec["config"], set=run.spec["set"])
        row = dict(row, status=status[run.name])
        rows.append(dict(row, group=run.group) if run.group else row)
    complete = all("val_loss" in r for r in rows)
    report = getattr(module, "report", None)
    text, failed = "", None
    if report and complete:
        try:
            text = user_code("the study's report(rows)", report, rows)
        except ConfigError as e:
            failed = e  # the results are written first; then the error
    declared_claims = claims.study_claims(module, study_cfg)
    declared = claims.declare(workdir, declared_claims, len(rows))
    if complete and (declared["claims"] or text):
        text = claims.section(rows, declared_claims, declared, text)
    out = dict(
        study=filename,
        study_config=json.loads(to_json(study_cfg)),
        complete=complete,
        claims=declared,
        rows=rows,
        report=text,
    )
    os.makedirs(workdir, exist_ok=True)
    write_text_atomic(os.path.join(workdir, "sweep.json"), json.dumps(out, indent=2))
    doc = (module.__doc__ or "").strip()
    md = f"# {filename}\n\n{doc}\n\n{results_table(rows)}\n"
    seeds = seed_table(rows)
    if seeds:
        md += f"\nOver seeds (mean ± sample std):\n\n{seeds}\n"
    if text:
        md += f"\n{text}\n"
    if not complete:
        md += "\n**Incomplete**: some runs failed or are missing; re-run the sweep.\n"
    write_text_atomic(os.path.join(workdir, "results.md"), md)
    plot_curves(rows, runs, os.path.join(workdir, "curves.png"))
    print(results_table(rows))
    if text:
        print(text)
    print(f"wrote {workdir}/sweep.json, results.md and curves.png")
    if failed:
        raise failed
    return out


def plot_curves(rows: list[dict], runs, path: str) -> None:
    """Validation loss against training tokens, one line per finished run; beside it, when the
    runs were scored on tasks, each task's accuracy per run (with its stderr)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mole_jax.train.metrics import read_metrics

    accs = [c for c in task_columns(rows) if c[2] == "acc"]
    fig, axes = plt.subplots(1, 2 if accs else 1, figsize=(12 if accs else 6, 4), squeeze=False)
    ax = axes[0][0]
    for row, run in zip(rows, runs, strict=True):
        if "val_loss" not in row:
            continue
        per_step = row["tokens_trained"] / max(1, row["steps"])
        pts = [(m["step"], m["val_loss"]) for m in read_metrics(run.dir) if "val_loss" in m]
        ax.plot([s * per_step for s, _ in pts], [v for _, v in pts], marker="o", label=run.name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if accs:
        _plot_accuracy(axes[0][1], [r for r in rows if "tasks" in r], accs)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def _plot_accuracy(ax, rows: list[dict], columns) -> None:
    width = 0.8 / max(1, len(columns))
    for j, (engine, task, _) in enumerate(columns):
        got = [r.get("tasks", {}).get(engine, {}).get("tasks", {}).get(task, {}) for r in rows]
        xs = [i + j * width for i in range(len(rows))]
        ax.bar(xs, [g.get("acc", 0) for g in got], width, yerr=[g.get("acc_stderr", 0) or 0
               for g in got], label=_task_head(engine, task, "acc"), capsize=2)  # fmt: skip
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([r["name"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
