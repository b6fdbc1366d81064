"""Preemption-safe training: SIGINT / SIGTERM (Ctrl-C, a scheduler's notice) ask the loop to
finish the current step, write a checkpoint at it and stop; a second signal ends the process at
once (orbax writes each checkpoint to a temporary directory and renames it when complete, so the
earlier checkpoints survive)."""

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
    """`with PreemptionGuard() as guard:` ... `guard.signum` is the first signal received (None
    until then). Outside the main thread (where Python cannot install handlers) it does nothing."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            return
        signal.signal(signum, signal.SIG_DFL)  # the second signal: end now
        os.kill(os.getpid(), signum)
