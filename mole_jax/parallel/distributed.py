"""Multi-host runs with JAX's own multi-controller runtime: one process per host (or per GPU),
all running the same program; `jax.distributed.initialize` connects them, after which
`jax.devices()` lists every process's devices and one mesh spans them all.

    launch.py train ... --coordinator=HOST:PORT --num_processes=N --process_id=I
On SLURM (several tasks) or a multi-host TPU slice, without those flags, JAX finds the
coordinator and the process ids itself. On CPU the processes talk through gloo collectives.
"""

from __future__ import annotations

import os

import jax

from mole_jax.errors import UserError


def initialize(coordinator=None, num_processes=None, process_id=None) -> bool:
    """Joins the processes of a multi-host run; False (and nothing done) for a single process."""
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise UserError("--coordinator, --num_processes and --process_id go together")
    if all(given):
        if not 0 <= process_id < num_processes:
            raise UserError(f"--process_id={process_id} must be in [0, {num_processes})")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)
        return True
    if _cluster_detected():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()  # JAX's own SLURM / TPU / MPI detection
        return True
    return False


def _cluster_detected() -> bool:
    """A SLURM job with several tasks, or a TPU slice of several hosts."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in os.environ:
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def is_primary() -> bool:
    """Whether this process writes the workdir's files (config, metrics, summaries)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits for every process to reach `name` (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
