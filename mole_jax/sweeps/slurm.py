"""Sweeps through submitit: a SLURM job array (`--executor=slurm`), or submitit's local executor
(`--executor=submitit_local`: the same code path on one machine, what the tests use).

Each array task runs one run exactly as the local executor does — the worker
(`python -m mole_jax.sweeps.worker <run>/sweep_spec.json`) as a subprocess logging to
`<run>/sweep.log` — so skipping finished runs, the one-line failure and the report are the same.
When SLURM preempts or times out a task, submitit calls `SweepJob.checkpoint`: the worker gets
SIGTERM (it finishes and checkpoints its step) and the task is requeued, resuming from there.
submitit's own logs go to `<workdir>/submitit/`.

    python launch.py sweep --config=experiments/kinds.py:size=160m --workdir=runs/kinds \\
        --executor=slurm --slurm=partition=gpu,gpus_per_node=1,cpus_per_task=8,timeout_min=720
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from mole_jax import platforms
from mole_jax.errors import UserError

GENERIC = {"timeout_min", "mem_gb", "nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task"}


class SweepJob:
    """What one array task runs: the sweep worker on one spec."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None

    def __call__(self, spec_path: str) -> int:
        log_path = os.path.join(os.path.dirname(spec_path), "sweep.log")
        with open(log_path, "a") as log:
            cmd = [sys.executable, "-m", "mole_jax.sweeps.worker", spec_path]
            env = platforms.for_another_host(dict(os.environ))  # the job's node picks its own
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
            return self.proc.wait()

    def checkpoint(self, spec_path: str):
        """Preempted or timed out: stop the worker (it checkpoints on SIGTERM), then requeue."""
        import submitit

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()
        return submitit.helpers.DelayedSubmission(SweepJob(), spec_path)


def parameters(params: dict, parallel: int, cluster: str) -> dict:
    """submitit parameters from `--slurm=key=value,...`: submitit's generic names as they are,
    the others as `slurm_<key>`; integers where they parse."""
    out = {}
    for key, value in params.items():
        value = int(value) if str(value).isdigit() else value
        out[key if key in GENERIC or key.startswith("slurm_") else f"slurm_{key}"] = value
    if cluster == "slurm":
        out.setdefault("slurm_array_parallelism", max(1, parallel))
    else:  # the local executor knows only the generic parameters
        out = {k: v for k, v in out.items() if k in GENERIC}
    out.setdefault("timeout_min", 24 * 60)
    return out


def execute_jobs(
    todo, parallel: int, executor: str, params: dict, write_spec, report_finished
) -> dict[str, str]:
    """Submits the runs as one job array and waits for them; {name: 'done' | 'failed: ...'}.
    `write_spec(run)` -> its spec path and `report_finished(run, rc, seconds)` -> its status are
    the sweep's own (`sweep.py`), so both executors write and report runs the same way."""
    import submitit

    if not todo:
        return {}
    cluster = "slurm" if executor == "slurm" else "local"
    folder = os.path.join(os.path.dirname(todo[0].dir), "submitit", "%j")
    ex = submitit.AutoExecutor(folder=folder, cluster=cluster)
    try:
        ex.update_parameters(name="mole_jax_sweep", **parameters(params, parallel, cluster))
    except (ValueError, TypeError) as e:
        raise UserError(f"--slurm: {e}") from None
    specs = [write_spec(r) for r in todo]
    t0 = time.perf_counter()
    jobs = ex.map_array(SweepJob(), specs)
    pending = {run.name: (run, job) for run, job in zip(todo, jobs, strict=True)}
    for run, job in pending.values():
        print(f"  {run.name}: submitted as job {job.job_id}, log in {run.dir}/sweep.log")
    status = {}
    try:
        while pending:
            time.sleep(1.0)
            for name, (run, job) in list(pending.items()):
                if job.done():
                    status[name] = report_finished(run, _exit_code(job), time.perf_counter() - t0)
                    del pending[name]
    finally:
        for _, job in pending.values():  # interrupted: the runs resume next time
            job.cancel(check=False)
    return status


def _exit_code(job) -> int | None:
    try:
        return job.result()
    except Exception:  # noqa: BLE001 - submitit raises for a job that died; its log says why
        return None
