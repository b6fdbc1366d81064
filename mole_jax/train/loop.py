"""`launch.py train`: run(cfg, workdir), the pretraining loop.

The loop is the only long function: periodic work (evaluation, checkpoints, profiling) are
`Hook`s with an `every=` (levanter's pattern), and per-step metrics go through `StepLog`, which
pulls them to the host one step late so dispatch stays asynchronous, stops the run on a
non-finite loss before any checkpoint of the diverged state is written, and hands each logged
row to the `on_row` callbacks (tests use one to stop a run as a crash would).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from mole_jax.data import pipeline
from mole_jax.errors import ConfigError, TrainingDiverged
from mole_jax.files import write_text_atomic
from mole_jax.model.config import comparable
from mole_jax.parallel import distributed
from mole_jax.progress import Progress
from mole_jax.train import accounting
from mole_jax.train.checkpoint import Checkpointer
from mole_jax.train.metrics import MetricsWriter, aux_stats, losses_up_to, read_metrics
from mole_jax.train.preempt import Preempted, PreemptionGuard
from mole_jax.train.trainer import Trainer, setup
from mole_jax.train.validate import validate
from mole_jax.workdir import Workdir, as_workdir


@dataclasses.dataclass
class Hook:
    """fn(step, state) after the steps that are multiples of `every` (0: never) or listed in
    `at`, and after the last step when `at_end`."""

    fn: Callable[[int, dict], None]
    every: int = 0
    at: tuple[int, ...] = ()
    at_end: bool = True
    name: str = ""  # shown as a phase of the progress while it runs ("" for per-step checks)

    def due(self, step: int, last: int) -> bool:
        periodic = bool(self.every and step % self.every == 0)
        return periodic or step in self.at or (self.at_end and step == last)


def evaluate_tokens(trainer: Trainer, params, rest, tokens) -> dict:
    """Validation loss and perplexity over `train.eval_batches` fixed windows of `tokens`."""
    cfg, t = trainer.cfg, trainer.cfg.train
    batch = t.batch_size // t.microbatches
    rows = trainer.process_rows(batch, micro=False)
    windows = pipeline.val_windows(tokens, batch, cfg.data.seq_len, t.eval_batches, rows)
    first = next(windows)  # val_windows yields one batch at least
    distributed.compiled_together(
        trainer.eval_fn, params, rest, trainer.put_eval(first, batch), name="eval compiled"
    )
    windows = itertools.chain([first], windows)
    losses = [float(trainer.eval_fn(params, rest, trainer.put_eval(b, batch))) for b in windows]
    loss = float(np.mean(losses))
    return {
        "val_loss": loss,
        "val_ppl": float(np.exp(loss)),
        "val_tokens": len(losses) * batch * cfg.data.seq_len,
    }


RESUME_FIELDS = (("model", None), ("data", ("corpus", "vocab_size", "seq_len")))


def run_digest(cfg) -> str:
    """SHA-256 of what a resumed run must keep: the model section and the data's identity."""
    import hashlib

    parts = []
    for section, fields in RESUME_FIELDS:
        d = _comparable(section, json.loads(cfg[section].to_json()))
        parts.append({k: d.get(k) for k in (fields or sorted(d))})
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _comparable(section: str, d: dict) -> dict:
    return comparable(d) if section == "model" else d


def _check_resume_compatible(cfg, wd: Workdir) -> None:
    """A workdir with checkpoints resumes only with the same model and data. If its config.json
    is corrupt, the newest checkpoint's record of them decides (and train rewrites the file)."""
    if not wd.has_checkpoints():
        return
    _check_steps(cfg, wd)
    if not wd.config_path.exists():
        return
    try:
        old = wd.config
    except ConfigError as e:
        ckpt = Checkpointer(wd)
        try:
            recorded = ckpt.meta().get("run_sha256")
        finally:
            ckpt.close()
        if recorded != run_digest(cfg):
            raise ConfigError(
                f"{e}; this config's model and data differ from the checkpoints'"
            ) from None
        print(f"warning: {e}; the checkpoints match this config, so config.json (and its "
              "checksum) are written again")  # fmt: skip
        return
    for section, fields in RESUME_FIELDS:
        a, b = (_comparable(section, json.loads(c[section].to_json())) for c in (old, cfg))
        for k in fields or sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                raise ConfigError(
                    f"{wd} holds a run with {section}.{k}={a.get(k)!r}, not {b.get(k)!r}; "
                    "use a new --workdir or the original config"
                )


def _check_steps(cfg, wd: Workdir) -> None:
    """A run resumed with fewer steps than it has trained would leave its newest checkpoint
    past the end (and config.json saying otherwise): refused before anything is written."""
    steps = [int(p.name) for p in wd.checkpoints_dir.iterdir() if p.name.isdigit()]
    newest = max(steps, default=0)
    if newest > cfg.train.steps:
        raise ConfigError(
            f"{wd} has trained to step {newest}, past train.steps={cfg.train.steps}; pass "
            f"--config.train.steps={newest} (or more) to continue it"
        )


DIVERGE_FACTOR, DIVERGE_WINDOW = 3.0, 20


class StepLog:
    """Per-step metrics, pulled one step late: `pend` a step's device metrics, `flush` them."""

    def __init__(self, cfg, wd: Workdir, start: int, ckpt, on_row: Sequence, progress: Progress):
        self.cfg, self.ckpt, self.on_row, self.progress = cfg, ckpt, on_row, progress
        primary = distributed.is_primary()  # the one process that writes metrics
        # (every process reads the losses before the writer trims the file: the same window)
        recent = losses_up_to(str(wd), start, DIVERGE_WINDOW)
        self.writer = MetricsWriter(str(wd), start) if primary else None
        progress.start_at(start)
        self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        self.last: dict = {"step": start}
        self.recent = collections.deque(recent, maxlen=DIVERGE_WINDOW)  # the last losses
        self.pending = None
        self.restart_clock()

    def restart_clock(self) -> None:
        self.t_ref = time.perf_counter()

    def pend(self, step: int, mets) -> None:
        self.pending = (step, mets)

    def flush(self) -> None:
        if self.pending is None:
            return
        (step, mets), self.pending = self.pending, None
        mets = jax.device_get(mets)
        now = time.perf_counter()
        dt, self.t_ref = now - self.t_ref, now
        row = {k: float(v) for k, v in mets.items() if k != "per_layer"}
        row.update(aux_stats(mets["per_layer"]))
        row.update(step_time_s=dt, tokens_per_s=self.tokens_per_step / dt)
        self._check_diverged(step, row)
        t = self.cfg.train
        if self.writer and (step % t.log_every == 0 or step == t.steps):
            self.writer.write(step, row)
        self.last.update(row, step=step)
        self.progress.update(1, loss=round(row["loss"], 3), **{"tokens/s": row["tokens_per_s"]})
        for fn in self.on_row:
            fn(step, row)

    def _check_diverged(self, step: int, row: dict) -> None:
        """Stops (before the state is evaluated or checkpointed) on a non-finite loss or
        parameter norm, or a loss over train.diverge_factor x its median of the last
        DIVERGE_WINDOW steps (a finite blow-up: at lr=5 the loss climbs to 120-227, uniform
        being ~9); train.diverge_factor=0 turns the second test off."""
        bad = next((k for k in ("loss", "param_norm") if not np.isfinite(row[k])), None)
        factor = self.cfg.train.get("diverge_factor", DIVERGE_FACTOR)  # (older configs: none)
        level = float(np.median(self.recent)) if len(self.recent) >= 5 else np.inf
        if bad:
            what = f"{bad} is {row[bad]} at step {step}"
        elif factor and row["loss"] > factor * level:
            what = (
                f"loss {row['loss']:.4g} at step {step} is over {factor:g}x its median of the "
                f"last {len(self.recent)} steps ({level:.4g}): diverged"
            )
        else:
            self.recent.append(row["loss"])
            return
        good = (self.ckpt.steps() or ["none"])[-1]
        raise TrainingDiverged(
            f"{what}; stopped before checkpointing it, the last checkpoint ({good}) is kept; "
            "lower train.lr or raise train.warmup_frac"
            + ("" if bad else " (train.diverge_factor=0 trains on)")
        )

    def record(self, step: int, row: dict) -> None:
        if self.writer:
            self.writer.write(step, row)
        self.last.update(row)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def _hooks(cfg, wd: Workdir, trainer: Trainer, td, log: StepLog, ckpt) -> list[Hook]:
    t = cfg.train

    def evaluate(step, state):
        log.record(step, evaluate_tokens(trainer, state["params"], state["rest"], td.val))

    hooks = [
        Hook(evaluate, t.eval_every, name="eval"),
        Hook(lambda step, state: ckpt.save(state), t.ckpt_every, name="checkpoint"),
    ]
    if t.profile_at:
        hooks.append(_profile_hook(wd, t.profile_at, t.profile_steps))
    return hooks


def _profile_hook(wd: Workdir, first: int, n: int) -> Hook:
    """A jax.profiler trace of steps first+1 .. first+n into W/profile (TensorBoard's profile
    plugin or Perfetto read it)."""

    def profile(step, state):
        if step == first:
            jax.profiler.start_trace(str(wd.path / "profile"))
        else:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()

    return Hook(profile, at=(first, first + n), at_end=False, name="profile")


def run(cfg, workdir, on_row: Sequence[Callable[[int, dict], None]] = ()) -> dict:
    """Trains `cfg` in `workdir`, resuming from its newest good checkpoint. Returns a summary.

    `on_row` callbacks get (step, metrics row) after each logged step.
    """
    wd = as_workdir(workdir)
    validate(cfg)
    if wd.path.exists() and not wd.path.is_dir():
        raise ConfigError(f"--workdir={wd.path} is a file, not a directory")
    _check_resume_compatible(cfg, wd)
    if not distributed.is_primary():
        distributed.barrier("data prepared")  # process 0 prepares it first; the others reuse it
    on = bool(cfg.train.progress and distributed.is_primary())
    with Progress("train", cfg.train.steps, 0, "step", enabled=on) as progress:
        progress.phase("preparing the data")
        # Before writing anything: a missing corpus leaves the workdir as it was.
        td = pipeline.prepare(cfg)
        return _train(cfg, wd, td, on_row, progress)


def _train(cfg, wd: Workdir, td, on_row: Sequence, progress: Progress) -> dict:
    lock = wd.writer_lock("train") if distributed.is_primary() else contextlib.nullcontext()
    with lock, PreemptionGuard() as guard:
        summary = write_workdir(cfg, wd, td.tokenizer.to_str())
        progress.phase("building the model and restoring the newest checkpoint")
        trainer = setup(cfg)
        ckpt = Checkpointer(wd, cfg.train.keep_ckpts, cfg.train.async_ckpt, run_digest(cfg))
        try:
            restored = ckpt.restore(trainer.abstract_state)
            state = trainer.init_state() if restored is None else restored[0]
            if state["opt_state"] is None:  # an imported model's step 0: a fresh optimiser
                state["opt_state"] = trainer.init_optimizer(state["params"])
            start = int(state["step"])
            _say_where(start, cfg.train.steps)
            log = StepLog(cfg, wd, start, ckpt, on_row, progress)
            try:
                hooks = _hooks(cfg, wd, trainer, td, log, ckpt)
                _loop(trainer, td, state, start, hooks, log, _preemption(guard, log, ckpt))
            finally:
                log.close()
        finally:
            ckpt.close()
    last = log.last
    result = {
        "workdir": str(wd),
        "step": last["step"],
        "loss": last.get("loss"),
        "val_loss": last.get("val_loss"),
        "tokens_per_s": last.get("tokens_per_s"),
        "params_total": summary["params_total"],
    }
    return _recorded(result, wd) if start == cfg.train.steps else result


def _say_where(start: int, steps: int) -> None:
    if distributed.is_primary():
        where = f"resuming from step {start} (of {steps})" if start else "starting fresh"
        print(where + (": nothing left to train" if start >= steps else ""), flush=True)


def _preemption(guard: PreemptionGuard, log: StepLog, ckpt: Checkpointer) -> Hook:
    """After every step: on a signal, checkpoint this step (unless a hook just did) and stop."""

    def check(step, state):
        if guard.stop_at(step) is None:
            return
        log.flush()
        if step not in ckpt.steps():
            ckpt.save(state)
        ckpt.close()  # waits for the write to finish
        raise Preempted(guard.signum, step)

    return Hook(check, every=1, at_end=False)


def write_workdir(cfg, wd: Workdir, tokenizer_json: str) -> dict:
    """The workdir's files (config, tokenizer, model summary), written by process 0 once the
    data is known to be there (after the others have prepared theirs); returns the accounting
    summary."""
    summary = accounting.summarize(cfg, jax.device_count())
    _check_same_tokenizer(wd, tokenizer_json)  # (every process: none waits on a refusal)
    if distributed.is_primary():
        distributed.barrier("data prepared")
        wd.path.mkdir(parents=True, exist_ok=True)
        wd.save_config(cfg)
        wd.write_checked(wd.tokenizer_path, tokenizer_json)  # eval/generate read it
        write_text_atomic(wd.summary_path, json.dumps(summary, indent=2))
    distributed.barrier("workdir written")
    return summary


def _check_same_tokenizer(wd: Workdir, tokenizer_json: str) -> None:
    """A run's tokenizer never changes after its first checkpoint: new token ids under the old
    weights would train on silently (a corpus cache that changed retrains the BPE, say)."""
    if not (wd.has_checkpoints() and wd.tokenizer_path.exists()):
        return
    old = wd.tokenizer_path.read_text()
    if old == tokenizer_json:
        return
    from tokenizers import Tokenizer

    a, b = (Tokenizer.from_str(t).get_vocab() for t in (old, tokenizer_json))
    moved = sum(1 for tok, i in a.items() if b.get(tok) != i)
    raise ConfigError(
        f"{wd.tokenizer_path} differs from the tokenizer this run would use ({len(a)} vs "
        f"{len(b)} tokens, {moved} of the run's ids map elsewhere); a run keeps its tokenizer "
        f"after its first checkpoint: pass --config.data.tokenizer={wd.tokenizer_path} (or "
        "train from the workdir's own config: launch.py train --workdir=...), or use a new "
        "--workdir"
    )


def _loop(trainer: Trainer, td, state, start: int, hooks: list[Hook], log: StepLog, stop: Hook):
    cfg = trainer.cfg
    t = cfg.train
    rows = trainer.process_rows(t.batch_size)
    log.progress.phase("compiling the train step")
    if start < t.steps:
        first = pipeline.train_batch(td.train, cfg.seed, start, t.batch_size, cfg.data.seq_len,
                                     rows)  # fmt: skip
        distributed.compiled_together(trainer.step_fn, state, *trainer.put_batch(first),
                                      name="train step compiled")  # fmt: skip
    for s in range(start, t.steps):
        batch = pipeline.train_batch(td.train, cfg.seed, s, t.batch_size, cfg.data.seq_len, rows)
        state, mets = trainer.step_fn(state, *trainer.put_batch(batch))
        log.flush()  # the previous step's metrics, while this step runs
        log.pend(s + 1, mets)
        for hook in hooks:
            if hook.due(s + 1, t.steps):
                log.flush()  # never evaluate or checkpoint a state not seen to be finite
                final = "final " if s + 1 == t.steps else ""
                log.progress.phase(f"{final}{hook.name} at step {s + 1}")
                hook.fn(s + 1, state)
                log.restart_clock()
        stop.fn(s + 1, state)
    log.flush()


def _recorded(result: dict, wd: Workdir) -> dict:
    """A run that was already complete trains nothing: report its last recorded metrics."""
    for row in read_metrics(str(wd)):
        result.update({k: row[k] for k in ("loss", "val_loss", "tokens_per_s") if k in row})
    return result
