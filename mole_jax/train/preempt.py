"""Preemption-safe training: SIGINT / SIGTERM (Ctrl-C, a scheduler's notice) ask the loop to
finish the current step, write a checkpoint at it and stop; a second signal ends the process at
once (orbax writes each checkpoint to a temporary directory and renames it when complete, so the
earlier checkpoints survive).

In a run of several processes the signal may reach any one of them (a scheduler's notice to one
host): after every step each process asks `guard.stop_at(step)`, which all-reduces "this
process got a signal" over the processes (the maximum of the signal numbers, one step late so
that dispatch stays asynchronous: `distributed.start_max`), so every process gets the same
answer at the same step, checkpoints that step with the others (orbax's multi-process save is
collective) and exits 128 + the signal, the ones that were not signalled included."""

from __future__ import annotations

import os
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Preempted(Exception):
    """Training stopped on a signal after checkpointing `step`; exit with 128 + signum."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class PreemptionGuard:
    """`with PreemptionGuard() as guard:` ... `guard.stop_at(step)` after each step: the signal
    to stop on (the same in every process), None to go on. `guard.received` is the first signal
    this process got; `guard.signum` the one the run stops on (in a single process, the first
    signal received, at once). Outside the main thread (where Python cannot install handlers)
    it installs nothing."""

    def __init__(self):
        self.signum: int | None = None
        self.received: int | None = None
        self._old: dict[int, object] = {}
        self._several = False  # processes (jax.distributed): stopping is agreed on
        self._vote = None  # the all-reduce started after the previous step

    def __enter__(self) -> PreemptionGuard:
        from mole_jax.parallel import distributed

        self._several = distributed.several_processes()
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def stop_at(self, step: int) -> int | None:
        """After `step`: the signal to stop on, or None to train on. With several processes,
        every process gets the same answer at the same step: whether any of them had a signal
        before the previous step's vote (the largest signal number: SIGTERM over SIGINT)."""
        if self.signum is not None or not self._several:
            return self.signum
        from mole_jax.parallel import distributed

        previous, self._vote = self._vote, None
        if previous is not None and (agreed := distributed.read_max(previous)) > 0:
            self.signum = agreed  # (stop here: no further vote, in any process)
        else:
            self._vote = distributed.start_max(self.received or 0)
        return self.signum

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            if not self._several:
                self.signum = signum
            return
        signal.signal(signum, signal.SIG_DFL)  # the second signal: end now
        os.kill(os.getpid(), signum)
