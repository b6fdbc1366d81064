"""`launch.py eval --tasks=...`: zero-shot (or few-shot) accuracy through lm-evaluation-harness.

Runs `lm_eval.simple_evaluate` on the `mole_jax` model (`mole_jax/eval/harness.py`) of a workdir
in an engine mode, and writes `<workdir>/eval/tasks.json` (`tasks_<mode>.json` for the other
modes): per task every metric with its stderr, the mode, step, LUT dtype, bytes read per token,
requests and seconds. Tasks come from the offline pack that ships with mole_jax (`mole_offline`:
`mole_jax/eval/tasks/`), from `--include_path`, and — only with `--allow_hub`, online — from
lm-eval's own list (ARC, HellaSwag, PIQA ...: their data lives on the Hugging Face hub).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mole_jax.errors import UserError
from mole_jax.files import write_text_atomic
from mole_jax.workdir import as_workdir

PACK_DIR = Path(__file__).parent / "tasks" / "mole_offline"
FILE_NAMES = {"experts": "tasks", "offload": "tasks_offload", "lut_memory": "tasks_lut"}
BOOTSTRAP_ITERS = 1000  # stderr of perplexity-type metrics (lm-eval's default 100,000 takes long)


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise UserError("zero-shot evaluation needs lm-eval: pip install -e '.[eval]'") from None
    return lm_eval


def task_manager(names: list[str], include_path: str | None, allow_hub: bool):
    """A TaskManager that knows `names`; one `error:` line for a name it cannot run here."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(PACK_DIR)] + ([include_path] if include_path else [])
    if include_path and not os.path.isdir(include_path):
        raise UserError(f"--include_path={include_path} is not a directory")
    local = TaskManager(include_path=paths, include_defaults=False)
    missing = [n for n in names if n not in local.all_tasks]  # names, not patterns
    if not missing:
        return local
    hub = TaskManager(include_path=paths, include_defaults=True)
    unknown = [n for n in missing if n not in hub.all_tasks]
    if unknown:
        raise UserError(
            f"unknown task(s) {', '.join(unknown)}; offline tasks here: "
            f"{', '.join(sorted(local.all_tasks))} (and any under --include_path)"
        )
    if not allow_hub:
        raise UserError(
            f"task(s) {', '.join(missing)} need the Hugging Face hub (lm-eval downloads their "
            "data); offline, run --tasks=mole_offline or tasks of your own with "
            "--include_path=DIR; online, add --allow_hub"
        )
    return hub


def run_tasks(
    workdir,
    tasks: list[str],
    mode: str = "experts",
    step: int | None = None,
    lut: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    include_path: str | None = None,
    allow_hub: bool = False,
    batch_size: int = 16,
) -> dict:
    """Scores `tasks` and writes the workdir's tasks JSON; returns what it wrote."""
    if not tasks:
        raise UserError("--tasks is empty; e.g. --tasks=mole_offline")
    if limit is not None and limit < 1:
        raise UserError(f"--limit={limit} must be positive")
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--num_fewshot={num_fewshot} must be >= 0")
    if not allow_hub:  # nothing may reach the hub unless asked
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    wd = as_workdir(workdir)
    lm_eval = _lm_eval()
    from mole_jax.eval.harness import MoleJaxLM

    manager = task_manager(tasks, include_path, allow_hub)
    lm = MoleJaxLM(str(wd), mode=mode, step=step, lut=lut, batch_size=batch_size)
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        bootstrap_iters=BOOTSTRAP_ITERS,
        log_samples=True,  # each document's score: `items`, for paired tests over the items
    )
    seconds = time.perf_counter() - t0
    record = dict(
        lm.usage(),
        tasks=_metrics({k: v for k, v in out["results"].items() if k not in out.get("groups", {})}),
        groups=_metrics(out.get("groups", {})),
        items=_items(out.get("samples") or {}),
        requests=lm.requests,
        seconds=round(seconds, 2),
        seconds_per_1000_requests=round(1000 * seconds / max(lm.requests, 1), 2),
        limit=limit,
        num_fewshot=num_fewshot,
        bootstrap_iters=BOOTSTRAP_ITERS,
        lm_eval_version=lm_eval.__version__,
    )
    name = FILE_NAMES.get(mode, f"tasks_{mode}") + (f"_{lut}" if lut and lut != "lut" else "")
    path = wd.eval_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=2))
    return dict(record, path=str(path))


def _items(samples: dict) -> dict:
    """{task: [each document's accuracy, by doc_id]} of the tasks scored by accuracy: the same
    documents for every model, so two models' scores pair item by item
    (mole_jax/sweeps/stats.bootstrap_items)."""
    out = {}
    for task, rows in samples.items():
        if rows and all(isinstance(r.get("acc"), (int, float)) for r in rows):
            out[task] = [float(r["acc"]) for r in sorted(rows, key=lambda r: r["doc_id"])]
    return out


def _metrics(results: dict) -> dict:
    """{task: {metric: value}} with lm-eval's ',none' filter suffix dropped."""
    out = {}
    for task, values in results.items():
        row = {}
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if filt and isinstance(value, (int, float)):
                row[metric if filt == "none" else f"{metric},{filt}"] = value
        out[task] = row
    return out


def summary_line(record: dict) -> str:
    """One line per task: its main metrics."""
    parts = []
    for task, row in record["tasks"].items():
        shown = [f"{k} {v:.4f}" for k, v in row.items() if not k.endswith("_stderr")][:3]
        parts.append(f"{task}: {', '.join(shown)}")
    return "; ".join(parts)
