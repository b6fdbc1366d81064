"""Multi-host runs with JAX's own multi-controller runtime: one process per host (or per GPU),
all running the same program; `jax.distributed.initialize` connects them, after which
`jax.devices()` lists every process's devices and one mesh spans them all.

    launch.py train ... --coordinator=HOST:PORT --num_processes=N --process_id=I
On SLURM (several tasks) or a multi-host TPU slice, without those flags, JAX finds the
coordinator and the process ids itself. On CPU the processes talk through gloo collectives.

Timeouts (`TIMEOUTS`): joining waits 10 minutes for the other processes; a process whose peer
died is ended by JAX's coordination service about `heartbeat` seconds later (JAX's fatal error,
SIGABRT); `barrier` waits a day (one process may prepare the data while the others wait) and
its timeout is one line. XLA:CPU's limit on how far apart a process's device threads may reach
a collective (40 s by default) is raised to 10 minutes: a loaded machine starves threads for
longer. Not configurable in jaxlib 0.10: gloo gives up connecting a collective's processes
when they first use it (each new set of devices) more than 30 s apart; so the train and eval
steps are compiled ahead and the processes meet at a barrier before running them
(`compiled_together`).
"""

from __future__ import annotations

import collections
import functools
import os
import re

import jax
import numpy as np

from mole_jax.errors import UserError

TIMEOUTS = dict(join=600, heartbeat=100, shutdown=120, barrier=24 * 3600, cpu_rendezvous=600)
_CPU_FLAGS = {  # XLA:CPU: a process's device threads meeting at a collective (unless given)
    "xla_cpu_collective_call_terminate_timeout_seconds": TIMEOUTS["cpu_rendezvous"],
    "xla_cpu_collective_call_warn_stuck_timeout_seconds": TIMEOUTS["cpu_rendezvous"] // 2,
}


class CollectiveTimeout(UserError):
    """The processes of a run did not meet in time (a peer died, hangs or is far behind)."""


def initialize(coordinator=None, num_processes=None, process_id=None) -> bool:
    """Joins the processes of a multi-host run; False (and nothing done) for a single process."""
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise UserError("--coordinator, --num_processes and --process_id go together")
    if all(given):
        if not 0 <= process_id < num_processes:
            raise UserError(f"--process_id={process_id} must be in [0, {num_processes})")
        _join(coordinator, num_processes, process_id)
        return True
    if _cluster_detected():
        _join()  # JAX's own SLURM / TPU / MPI detection
        return True
    return False


def _join(*args) -> None:
    _set_cpu_flags()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        *args,
        initialization_timeout=TIMEOUTS["join"],
        heartbeat_timeout_seconds=TIMEOUTS["heartbeat"],
        shutdown_timeout_seconds=TIMEOUTS["shutdown"],
    )


def _set_cpu_flags() -> None:
    """XLA_FLAGS (read when the backend starts, after this) for the CPU collectives' timeouts,
    unless given."""
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f"--{k}={v}" for k, v in _CPU_FLAGS.items() if f"--{k}=" not in flags]
    os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


def _cluster_detected() -> bool:
    """A SLURM job with several tasks, or a TPU slice of several hosts."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in os.environ:
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def several_processes() -> bool:
    """Whether this is one of several processes of a run (without starting a backend if not)."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


def is_primary() -> bool:
    """Whether this process writes the workdir's files (config, metrics, summaries)."""
    return jax.process_index() == 0


_barriers: collections.Counter = collections.Counter()


def compiled_together(fn, *args, name: str) -> None:
    """In a run of several processes, compiles `fn` for `args` (jit's cache keeps it) and waits
    at a barrier, so the processes first run its collectives together: gloo gives up when they
    arrive more than 30 s apart, as one slower compile on a loaded host makes them."""
    if jax.process_count() == 1 or id(fn) in _compiled:
        return
    fn.lower(*args).compile()
    barrier(name)
    _compiled.add(id(fn))  # once per function: its later calls find jit's cache


_compiled: set[int] = set()


def barrier(name: str, timeout_s: float | None = None) -> None:
    """Waits for every process to reach `name` (nothing to wait for in a single process): the
    coordination service's barrier, no device collective (so no gloo connection set-up, which
    waits 30 s at most); a timeout is one line (CollectiveTimeout)."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed

    _barriers[name] += 1  # every process passes each name as many times: ids stay in step
    timeout_s = TIMEOUTS["barrier"] if timeout_s is None else timeout_s
    try:
        jax_distributed.global_state.client.wait_at_barrier(
            f"mole_jax:{name}:{_barriers[name]}", int(timeout_s * 1000)
        )
    except Exception as e:  # noqa: BLE001 - the runtime raises its own error types
        raise CollectiveTimeout(
            f"process {jax.process_index()} waited {timeout_s:.0f} s at {name!r} for the other "
            f"processes ({_first_line(e)})"
        ) from None


@functools.cache
def _vote_fns():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()), ("all",))
    spread = NamedSharding(mesh, PartitionSpec("all"))
    return spread, jax.jit(lambda x: x.max(), out_shardings=NamedSharding(mesh, PartitionSpec()))


def start_max(value: int) -> jax.Array:
    """Starts the maximum of this process's `value` and the others' (one all-reduce of an
    int32 over every device) and returns without waiting; `read_max` waits for it. Every
    process must call it, in the same order among its other collectives."""
    spread, fn = _vote_fns()
    shape = (jax.device_count(),)
    x = jax.make_array_from_callback(shape, spread, lambda _: np.full((1,), value, np.int32))
    return fn(x)


def read_max(started: jax.Array) -> int:
    return int(np.asarray(started.addressable_data(0)))


def collective_failure(e: BaseException) -> str | None:
    """One line for a collective of several processes that failed (a peer died or did not come
    in time: gloo's timeouts, a closed connection, the coordination service's report), if that
    is what `e` is; None otherwise."""
    text = str(e)
    marks = ("Gloo", "DEADLINE_EXCEEDED", "Connection closed by peer", "coordination service")
    if not any(m in text for m in marks):
        return None
    return (
        f"the processes of this run lost each other in a collective ({_first_line(e)}): a "
        "peer died, hangs or is far behind; run the same command on every host again to "
        "resume from the last checkpoint"
    )


def _first_line(e: BaseException) -> str:
    return _brief(str(e)) or type(e).__name__


def _brief(text: str, n: int = 240) -> str:
    """The runtime's message on one line: without its [type.googleapis.com/...] payloads."""
    text = " ".join(re.sub(r"\[type\.googleapis\.com/[^\]]*\]", "", text).split())
    return text if len(text) <= n else text[: n - 3] + "..."
