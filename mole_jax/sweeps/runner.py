"""`launch.py sweep`: a study's runs, each trained (or resumed), exported and evaluated as the study
asks, gathered into one table.

A study is a file `experiments/<study>.py` whose docstring states its question and the expected
result, with
    get_config(arg) -> ConfigDict   the study's knobs (size, steps, ...), set as
                                    `--config=experiments/s.py:steps=50` or `--config.steps=50`
    get_sweep(c) -> list[dict]      one dict per run:
        name    its directory under --workdir (unique; letters, digits and - _ .)
        config  'configs/<kind>.py:<arg>'
        set     {'train.steps': 300, ...}: dotted overrides of that config (optional)
        seeds   (optional) k: the run is trained k times, as `<name>-s0` ... with `seed` = 0 ..
                k-1; the report gives each metric's mean ± std over them
        tasks   (optional) lm-eval task names (e.g. ['mole_offline']): scored on the trained
                model and on each eval's engine; `task_limit` caps the documents per task
        evals   (optional) validation losses to measure after training, each a dict with
                name    its column in the table
                export  a LUT dtype: the experts are exported to <run>/lut_<dtype>
                mode    'offload' (LUT rows read from the store; the default with export),
                        'lut_memory' (the whole LUT on the device) or 'experts' (the trained
                        model in memory, the default without export)
    CLAIMS                          the paper's claims the study tests, declared before it
                                    runs (`mole_jax/sweeps/claims.py`: Claim, Trend); recorded
                                    in <workdir>/claims.json, tested with Holm's correction
    report(rows) -> str             (optional) the study's further reading, labelled exploratory

Every run's config is built and validated before any run starts, and the corpora are prepared
once. Each run is a subprocess (`python -m mole_jax.sweeps.worker <run>/sweep_spec.json`),
`--parallel` at a time, logging to `<run>/sweep.log`. A run whose `sweep_result.json` records the
same spec is skipped; a killed one resumes from its checkpoint. The sweep writes
`<workdir>/sweep.json` (`complete` is false while any run is missing or failed), `results.md` and
`curves.png` (validation loss of every run).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import ml_collections

from mole_jax.config import apply_overrides, load_file, load_module, to_json, user_code
from mole_jax.errors import ConfigError, UserError
from mole_jax.files import write_text_atomic
from mole_jax.progress import Progress
from mole_jax.stores import quant
from mole_jax.sweeps import claims
from mole_jax.sweeps.worker import LOG, RESULT, SPEC, finished_result
from mole_jax.train.validate import validate
from mole_jax.workdir import Workdir

RUN_KEYS = {"name", "config", "set", "evals", "tasks", "task_limit", "seeds"}
EVAL_KEYS = {"name", "export", "mode"}
EVAL_MODES = ("experts", "offload", "lut_memory")
EXECUTORS = ("local", "slurm", "submitit_local")


@dataclass
class Run:
    name: str
    dir: str
    spec: dict  # what the worker needs, and what a finished result must match
    cfg: ml_collections.ConfigDict
    group: str = ""  # the study's run name when it was expanded over seeds


def load_study(filename: str):
    path = filename.partition(":")[0]
    if not os.path.isfile(path):
        raise UserError(f"study file '{path}' does not exist")
    module = user_code(f"study '{path}'", load_module, path)
    if not callable(getattr(module, "get_sweep", None)):
        raise UserError(
            f"study '{path}' has no get_sweep(config) function (see mole_jax/sweeps/runner.py)"
        )
    return module


def plan(module, study_cfg, workdir: str) -> list[Run]:
    """The study's runs, configs built and validated; a bad one raises ConfigError naming it."""
    specs = user_code("the study's get_sweep(config)", module.get_sweep, study_cfg)
    if not specs:
        raise ConfigError("the study's get_sweep returned no runs")
    runs, seen = [], set()
    for raw, group in _over_seeds(specs):
        name = raw.get("name", "") if isinstance(raw, dict) else ""
        where = f"run '{name}'" if name else f"run {raw!r}"
        try:
            runs.append(_plan_one(raw, workdir, group))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        if name in seen:
            raise ConfigError(f"{where}: two runs have this name; names must be unique")
        seen.add(name)
    return runs


def _over_seeds(specs):
    """(run, group) of each run: a run with `seeds=k` becomes k runs `<name>-s<i>`, seed i."""
    for raw in specs:
        if not isinstance(raw, dict) or "seeds" not in raw:
            yield raw, ""
            continue
        k, name = raw["seeds"], raw.get("name", "")
        if not isinstance(k, int) or k < 1:
            raise ConfigError(f"run '{name}': seeds={k!r} must be a positive integer")
        if "seed" in raw.get("set", {}):
            raise ConfigError(f"run '{name}': give seeds or set seed, not both")
        for i in range(k):
            run = {key: v for key, v in raw.items() if key != "seeds"}
            yield dict(run, name=f"{name}-s{i}", set=dict(raw.get("set", {}), seed=i)), name


def _plan_one(raw: dict, workdir: str, group: str = "") -> Run:
    if not isinstance(raw, dict) or not {"name", "config"} <= set(raw):
        raise ConfigError("a run is a dict with at least 'name' and 'config'")
    unknown = set(raw) - RUN_KEYS
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)}; a run has {sorted(RUN_KEYS)}")
    name = raw["name"]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", str(name)):
        raise ConfigError(f"name {name!r} must be letters, digits and - _ . (a directory name)")
    cfg = apply_overrides(load_file(raw["config"]), dict(raw.get("set", {})))
    validate(cfg)
    evals = [_check_eval(e, cfg) for e in raw.get("evals", [])]
    if len({e["name"] for e in evals}) != len(evals):
        raise ConfigError("two evals have the same name")
    spec = dict(
        name=name,
        config=raw["config"],
        set=dict(raw.get("set", {})),
        evals=evals,
        resolved=json.loads(to_json(cfg)),
    )
    if raw.get("tasks"):
        spec.update(tasks=_check_tasks(raw["tasks"]), task_limit=raw.get("task_limit"))
    return Run(name, os.path.join(workdir, name), spec, cfg, group)


def _check_tasks(tasks) -> list[str]:
    """Task names lm-eval can run here (offline: the pack and nothing from the hub)."""
    from mole_jax.eval.zero_shot import task_manager

    if isinstance(tasks, str) or not all(isinstance(t, str) for t in tasks):
        raise ConfigError(f"tasks={tasks!r} must be a list of lm-eval task names")
    try:
        task_manager(list(tasks), None, allow_hub=False)
    except UserError as e:
        raise ConfigError(str(e)) from None
    return list(tasks)


def _check_eval(e: dict, cfg) -> dict:
    if not isinstance(e, dict) or "name" not in e or set(e) - EVAL_KEYS:
        raise ConfigError(f"eval {e!r} must be a dict with 'name' and 'export' and/or 'mode'")
    mode = e.get("mode", "offload" if "export" in e else "experts")
    if mode not in EVAL_MODES:
        raise ConfigError(f"eval '{e['name']}': mode={mode!r} is not one of {EVAL_MODES}")
    if (mode == "experts") == ("export" in e):
        raise ConfigError(
            f"eval '{e['name']}': modes offload and lut_memory read an exported LUT "
            "(give export=<dtype>); mode experts reads none"
        )
    if "export" in e and e["export"] not in quant.DTYPES:
        dtypes = "|".join(quant.DTYPES)
        raise ConfigError(f"eval '{e['name']}': export={e['export']!r} is not one of {dtypes}")
    mole = cfg.model.ffn.kind == "mole"
    if mode != "experts" and not (mole and cfg.model.ffn.mole.expert_input == "embedding"):
        raise ConfigError(
            f"eval '{e['name']}' needs a lookup table, which only a MoLE model whose experts read "
            "the embedding has"
        )
    return dict(e, mode=mode)


def prepare_data(runs: list[Run]) -> None:
    """Obtains each distinct corpus/tokenizer once, so parallel runs never race to build them."""
    from mole_jax.data import pipeline

    done = set()
    for run in runs:
        key = to_json(run.cfg.data)
        if key not in done:
            pipeline.prepare(run.cfg)
            done.add(key)


def execute(runs: list[Run], parallel: int, executor: str = "local", params=None):
    """Runs the unfinished runs (`executor`: 'local' subprocesses, or through submitit: 'slurm'
    job arrays, 'submitit_local'); returns {name: 'skipped'|'done'|'failed: ...'}."""
    status = {r.name: "skipped" for r in runs if finished_result(r.dir, r.spec) is not None}
    todo = [r for r in runs if r.name not in status]
    for r in runs:
        if r.name in status:
            print(f"  {r.name}: finished earlier with this spec, skipped", flush=True)
    if executor != "local":
        from mole_jax.sweeps.slurm import execute_jobs

        jobs = execute_jobs(todo, parallel, executor, params or {}, write_spec, report_finished)
        return dict(status, **jobs)
    return dict(status, **_execute_local(todo, parallel))


def _execute_local(todo: list[Run], parallel: int) -> dict[str, str]:
    status = {}
    active: list[tuple[Run, subprocess.Popen, float, object]] = []
    progress = Progress("sweep", len(todo), 0, "run")
    try:
        while todo or active:
            while todo and len(active) < max(1, parallel):
                active.append(_start(todo.pop(0)))
            time.sleep(0.2)
            for item in [a for a in active if a[1].poll() is not None]:
                active.remove(item)
                status[item[0].name] = _finish(*item)
                failed = sum(s.startswith("failed") for s in status.values())
                progress.update(1, running=len(active), failed=failed)
    finally:
        progress.close()
        for _, proc, _, log in active:  # interrupted: the runs resume next time
            proc.terminate()
            proc.wait()
            log.close()
    return status


def write_spec(run: Run) -> str:
    """The run's spec in its directory (and no result of another spec): what a worker runs."""
    os.makedirs(run.dir, exist_ok=True)
    stale = os.path.join(run.dir, RESULT)  # of another spec: it must not outlive this attempt
    if os.path.exists(stale):
        os.remove(stale)
    spec_path = os.path.join(run.dir, SPEC)
    write_text_atomic(spec_path, json.dumps(run.spec, indent=2))
    return spec_path


def _start(run: Run):
    spec_path = write_spec(run)
    log = open(os.path.join(run.dir, LOG), "a")
    cmd = [sys.executable, "-m", "mole_jax.sweeps.worker", spec_path]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    print(f"  {run.name}: started ({run.spec['config']}), log in {log.name}", flush=True)
    return run, proc, time.perf_counter(), log


def _finish(run: Run, proc: subprocess.Popen, t0: float, log) -> str:
    log.close()
    return report_finished(run, proc.returncode, time.perf_counter() - t0)


def report_finished(run: Run, rc: int | None, took: float) -> str:
    """One line for a run that ended with exit status `rc`; its status for the sweep."""
    result = finished_result(run.dir, run.spec) if rc == 0 else None
    if result is None:
        last = _last_line(os.path.join(run.dir, LOG))
        print(f"  {run.name}: FAILED (exit {rc}) after {took:.0f}s: {last}", flush=True)
        return f"failed: {last}"
    print(f"  {run.name}: done in {took:.0f}s, val_loss {result['val_loss']:.4f}", flush=True)
    return "done"


def _last_line(path: str) -> str:
    with open(path, errors="replace") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1]


def run_sweep(
    filename: str,
    study_cfg,
    workdir: str,
    parallel: int = 1,
    dry_run: bool = False,
    executor: str = "local",
    params: dict | None = None,
    store: str | None = None,
):
    """The `sweep` command. Returns the sweep's summary (also written to <workdir>/sweep.json).
    executor: 'local' (subprocesses here), 'slurm' (a submitit job array; `params` are its
    parameters) or 'submitit_local' (submitit's local executor). `store`: a folder or URL under
    which each run's LUTs are exported (`<store>/<run>/lut_<dtype>`; default: the run's folder)."""
    if executor not in EXECUTORS:
        raise UserError(f"--executor={executor} is not one of {', '.join(EXECUTORS)}")
    from mole_jax.sweeps import report

    module = load_study(filename)
    runs = plan(module, study_cfg, workdir)
    base = store if not store or "://" in store else os.path.abspath(store)  # workers' cwd differ
    for r in runs if base else ():
        r.spec["store"] = f"{base.rstrip('/')}/{r.name}"
    declared = claims.study_claims(module, study_cfg, {r.group or r.name for r in runs})
    print(f"study {filename}: {len(runs)} run(s) under {workdir}")
    for c in declared:
        print(f"  claim: {c.label}" + (f" ({c.source})" if c.source else ""))
    if dry_run:
        print(report.plan_table(runs))
        return {"runs": [r.spec for r in runs], "claims": claims.describe(declared),
                "dry_run": True}  # fmt: skip
    with Workdir(workdir).writer_lock("sweep"):
        done = sum(finished_result(r.dir, r.spec) is not None for r in runs)
        claims.declare(workdir, declared, done)  # before any run starts
        prepare_data(runs)
        status = execute(runs, parallel, executor, params)
        out = report.write(module, filename, study_cfg, workdir, runs, status)
    failed = [n for n, s in status.items() if s.startswith("failed")]
    if failed:
        raise UserError(
            f"{len(failed)} of {len(runs)} run(s) failed ({', '.join(failed)}); each run's log is "
            f"<run>/{LOG}; fix and re-run the sweep: finished runs are skipped"
        )
    return out
