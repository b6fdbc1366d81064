"""One run of a sweep, in its own process: `python -m mole_jax.sweeps.worker <run>/sweep_spec.json`.

Trains the spec's resolved config in the run's directory (resuming from its checkpoint), measures
the spec's evals, and writes `<run>/sweep_result.json` last, so a result on disk always means a
finished run. A user mistake ends with one `error:` line and exit status 2.
"""

from __future__ import annotations

import json
import os
import sys
import time

from mole_jax.files import write_text_atomic

SPEC, RESULT, LOG = "sweep_spec.json", "sweep_result.json", "sweep.log"
SUMMARY_KEYS = (
    "params_total",
    "params_resident",
    "params_active_per_token",
    "flops_per_token",
    "lut_values_per_token",
)
EVAL_KEYS = ("loss", "ppl", "mode", "tokens", "lut_dtype", "bytes_per_token", "cache_hit_rate",
             "io_requests", "io_bytes")  # fmt: skip


def finished_result(run_dir: str, spec: dict) -> dict | None:
    """The result in `run_dir` if the run finished with exactly `spec`, else None."""
    path = os.path.join(run_dir, RESULT)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            result = json.load(f)
    except json.JSONDecodeError:
        return None
    return result if result.get("spec") == spec else None


def run_spec(spec: dict, run_dir: str) -> dict:
    from mole_jax.config import from_dict
    from mole_jax.train import loop

    cfg = from_dict(spec["resolved"])
    t0 = time.perf_counter()
    out = loop.run(cfg, run_dir)
    train_s = time.perf_counter() - t0
    with open(os.path.join(run_dir, "model_summary.json")) as f:
        summary = json.load(f)
    exported: set[str] = set()
    evals = {e["name"]: run_eval(run_dir, e, exported, spec.get("store")) for e in spec["evals"]}
    tasks = {}
    if spec.get("tasks"):
        tasks = {e["name"]: run_tasks(run_dir, spec, e) for e in [MODEL_EVAL, *spec["evals"]]}
    t = cfg.train
    return dict(
        name=spec["name"],
        config=spec["config"],
        set=spec["set"],
        kind=cfg.model.ffn.kind,
        steps=out["step"],
        tokens_trained=out["step"] * t.batch_size * cfg.data.seq_len,
        loss=out["loss"],
        val_loss=out["val_loss"],
        tokens_per_s=out["tokens_per_s"],
        wall_s=train_s,
        **{k: summary[k] for k in SUMMARY_KEYS if k in summary},
        evals=evals,
        tasks=tasks,
        spec=spec,
    )


def lut_location(e: dict, store: str | None) -> str | None:
    """Where eval `e`'s LUT is: `lut_<dtype>` in the run's folder, or under the sweep's --store
    URL (the run's own prefix); None for an eval that reads no exported LUT."""
    if "export" not in e:
        return None
    name = f"lut_{e['export']}"
    return f"{store}/{name}" if store else name


def run_eval(run_dir: str, e: dict, exported: set[str], store: str | None = None) -> dict:
    from mole_jax.eval.validation import evaluate
    from mole_jax.infer.export import export_lut
    from mole_jax.workdir import Workdir

    lut = "lut"
    if "export" in e:
        lut = lut_location(e, store)
        if lut not in exported:  # two evals of one dtype share its export
            export_lut(run_dir, dtype=e["export"], out=lut)
            exported.add(lut)
    options = {} if e["mode"] == "experts" else {"store": lut}
    n = Workdir(run_dir).config.train.eval_batches  # the windows the run's own val_loss used
    r = evaluate(run_dir, e["mode"], write=False, n_batches=n, **options)
    usage = [k for k in r if k.startswith(("usage/", "unevenness/"))]  # product-key layers
    return {k: r[k] for k in (*EVAL_KEYS, *usage) if k in r}


MODEL_EVAL = {"name": "model", "mode": "experts"}  # the trained model in memory
TASK_KEYS = ("tasks", "groups", "items", "requests", "seconds", "bytes_read_per_token", "lut_dtype")


def run_tasks(run_dir: str, spec: dict, e: dict) -> dict:
    """The spec's lm-eval tasks on eval `e`'s engine (its store, if it reads one)."""
    from mole_jax.eval import zero_shot

    lut = lut_location(e, spec.get("store"))
    r = zero_shot.run_tasks(
        run_dir, spec["tasks"], e["mode"], lut=lut, limit=spec.get("task_limit")
    )
    return {k: r[k] for k in TASK_KEYS if k in r}


def main(argv: list[str]) -> int:
    from mole_jax.errors import UserError
    from mole_jax.train.preempt import Preempted

    if len(argv) != 1:
        print("usage: python -m mole_jax.sweeps.worker <run>/sweep_spec.json", file=sys.stderr)
        return 2
    spec_path = argv[0]
    run_dir = os.path.dirname(spec_path)
    try:
        with open(spec_path) as f:
            spec = json.load(f)
        result = run_spec(spec, run_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:  # the sweep was stopped: this run resumes when it is run again
        print(f"{e}: checkpoint saved", file=sys.stderr)
        return e.exit_code
    path = os.path.join(run_dir, RESULT)
    write_text_atomic(path, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
