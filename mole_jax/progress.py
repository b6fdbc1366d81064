"""Progress of long work (train, eval, export, generate, import, sweeps) the same way everywhere.

On a terminal (stdout is a TTY) a tqdm bar on stderr; otherwise (a log file, a pipe, a scheduler's
output file) one line on stdout every `every_s` seconds, written by a timer thread so that a line
comes even while a step compiles or a final evaluation runs:

    train: step 40/100 (40%), loss 5.123, 7,879 tokens/s, 31 s, ETA 47 s
    train: final eval and checkpoint of step 100, 12 s

`phase(text)` names what runs between updates (compiling, the final eval, a checkpoint); the
phase is shown on the bar and in the lines, and announced once when it begins. Silent when
`enabled` is False (non-primary processes of a multi-host run, `train.progress=False`); where it
is None, as in eval, export and generate, it follows `enable()`, which `launch.py` calls: the
library stays quiet for tests and benchmarks that call it.
"""

from __future__ import annotations

import os
import sys
import threading
import time


# Seconds between progress lines without a TTY (MOLE_JAX_PROGRESS_EVERY_S overrides: a test
# watching a log need not wait for 10 s lines).
def _every_s() -> float:
    try:
        return max(0.1, float(os.environ.get("MOLE_JAX_PROGRESS_EVERY_S", 10.0)))
    except ValueError:  # a bad value: the default, not a traceback at import
        return 10.0


EVERY_S = _every_s()
_ENABLED = False


def enable(on: bool = True) -> None:
    """Progress for the work that does not say itself (`enabled=None`): on in `launch.py`."""
    global _ENABLED
    _ENABLED = on


def _seconds(s: float) -> str:
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s // 60 % 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s} s"


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"
    return str(value)


def _field(name: str, value) -> str:
    """'loss 5.123', or '7,879 tokens/s' for a rate."""
    return f"{_value(value)} {name}" if name.endswith("/s") else f"{name} {_value(value)}"


class Progress:
    """`with Progress("train", total=100, initial=0, unit="step") as p: p.update(1, loss=...)`."""

    def __init__(
        self,
        desc: str,
        total: int | None,
        initial: int = 0,
        unit: str = "step",
        enabled: bool | None = None,
        every_s: float = EVERY_S,
        stream=None,
    ):
        self.desc, self.total, self.n, self.unit = desc, total, initial, unit
        self.fields, self.phase_text = {}, ""
        self.t0 = self.phase_t0 = time.perf_counter()
        self.rate_from: tuple[float, int] | None = None  # (time, n) of the first update: the
        # rate, and so the ETA, leaves out what came before it (data, compilation)
        self.stream = stream or sys.stdout
        enabled = _ENABLED if enabled is None else enabled
        self.enabled, self.bar, self._stop = enabled, None, threading.Event()
        self._thread = None
        if not enabled:
            return
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr)
        else:
            self._thread = threading.Thread(target=self._tick, args=(every_s,), daemon=True)
            self._thread.start()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, **fields) -> None:
        if self.rate_from is None:
            self.rate_from = (time.perf_counter(), self.n)
        self.n += n
        self.fields.update(fields)
        self.phase_text = ""
        if self.bar is not None:
            self.bar.set_description(self.desc, refresh=False)
            self.bar.set_postfix(
                {k: _field("", v).strip() for k, v in fields.items()}, refresh=False
            )
            self.bar.update(n)

    def start_at(self, n: int) -> None:
        """Where the work begins, once known (a resumed run's step)."""
        self.n = n
        if self.bar is not None:
            self.bar.n = self.bar.last_print_n = n
            self.bar.refresh()

    def phase(self, text: str) -> None:
        """What runs now until the next `update` (announced once, then in every line)."""
        self.phase_text, self.phase_t0 = text, time.perf_counter()
        if self.bar is not None:
            self.bar.set_description(f"{self.desc} ({text})")
        elif self.enabled:
            self._say(f"{self.desc}: {text}")

    def line(self) -> str:
        """The status line a log gets: position, fields, elapsed time and ETA (or the phase)."""
        now = time.perf_counter()
        if self.phase_text:
            return f"{self.desc}: {self.phase_text}, {_seconds(now - self.phase_t0)}"
        where = f"{self.unit} {self.n}"
        if self.total:
            where += f"/{self.total} ({100 * self.n / self.total:.0f}%)"
        parts = [where] + [_field(k, v) for k, v in self.fields.items()]
        parts.append(_seconds(now - self.t0))
        if self.rate_from and self.total and self.n < self.total:
            t, n = self.rate_from
            if self.n - n > 1:  # the first update's own time is not in the rate
                parts.append(
                    "ETA " + _seconds((now - t) / (self.n - n - 1) * (self.total - self.n))
                )
        return f"{self.desc}: " + ", ".join(parts)

    def _say(self, text: str) -> None:
        try:
            print(text, file=self.stream, flush=True)
        except (OSError, ValueError):  # a closed pipe or stream: progress is not worth a crash
            self._stop.set()

    def _tick(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self._say(self.line())

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
