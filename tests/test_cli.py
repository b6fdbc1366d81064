"""The command line a newcomer meets: help for every command with the config's fields, progress
lines in a log, and a summary that says what it assumed and what would fit."""

import io
import os
import sys
import time

import pytest
from conftest import ROOT, run_bounded

from configs import mole
from mole_jax import progress
from mole_jax.cli.help import COMMANDS
from mole_jax.cli.summary import render
from mole_jax.config import load_file
from mole_jax.train import accounting, memory


def launch(*args):
    return run_bounded([sys.executable, os.path.join(ROOT, "launch.py"), *args], timeout=120)


def test_help_lists_the_commands_and_exits_0():
    for flag in ("-h", "--help"):
        proc = launch(flag)
        assert proc.returncode == 0, proc.stderr
        assert all(f"  {name} " in proc.stdout for name in COMMANDS), proc.stdout
    proc = launch()  # no command: a usage error, pointing at --help
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--help" in proc.stderr


def test_command_help_lists_its_flags_and_the_config_fields_with_defaults():
    proc = launch("train", "--help")
    assert proc.returncode == 0, proc.stderr
    steps = mole.get_config().train.steps
    assert f"--config.train.steps={steps}  (int)" in proc.stdout
    assert "--workdir:" in proc.stdout and "--offload" not in proc.stdout  # train's flags only
    proc = launch("summary", "-h", "--config=configs/moe.py:size=tiny")
    assert proc.returncode == 0 and "config fields of configs/moe.py:size=tiny" in proc.stdout
    assert "--config.model.ffn.moe.experts=" in proc.stdout and "--budget_gib" in proc.stdout
    proc = launch("export", "--help")
    assert "nf3" in proc.stdout and "config fields" not in proc.stdout


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


class _Log(io.StringIO):
    def isatty(self):
        return False


def test_progress_writes_a_line_per_interval_with_eta_and_phases():
    out = _Log()
    with progress.Progress("train", 10, 0, "step", enabled=True, every_s=0.05, stream=out) as p:
        p.phase("compiling the train step")
        time.sleep(0.12)
        for _ in range(4):
            p.update(1, loss=5.5, **{"tokens/s": 1234.0})
        time.sleep(0.12)
    lines = _lines(out)
    assert lines[0] == "train: compiling the train step"
    assert any(line.startswith("train: compiling the train step, ") for line in lines[1:])
    last = [line for line in lines if "step 4/10" in line]
    assert last and "loss 5.5" in last[-1] and "1,234 tokens/s" in last[-1] and "ETA" in last[-1]
    quiet = _Log()
    with progress.Progress("train", 10, enabled=False, every_s=0.01, stream=quiet) as p:
        p.phase("x")
        p.update(1)
        time.sleep(0.05)
    assert quiet.getvalue() == ""


def test_summary_says_its_assumptions_and_the_fewest_microbatches_that_fit():
    cfg = load_file(os.path.join(ROOT, "configs/mole.py:size=160m,experts=16"))
    s = accounting.summarize(cfg, platform="cpu")
    text = render(cfg, s, 80)
    assert "assumed: 1 device, mesh data=1 fsdp=1 expert=1 tensor=1" in text
    assert f"batch {cfg.train.batch_size} x {cfg.data.seq_len} tokens in 1 micro-batch" in text
    advice = [line for line in text.splitlines() if "--config.train.microbatches=" in line]
    micro = int(advice[0].split("microbatches=")[1].split()[0])
    fewer = cfg.copy_and_resolve_references()
    fewer.train.microbatches = micro
    assert memory.plan(fewer, s["mesh"], "cpu")["total"] <= 80 * 2**30
    assert "does not fit in 80 GiB per device" in text and "GiB" in text and "(0.000" not in text
    tiny = load_file(os.path.join(ROOT, "configs/mole.py:size=tiny"))
    assert "fits in 80 GiB per device" in render(tiny, accounting.summarize(tiny), 80)


def test_a_hung_child_fails_its_test_with_its_stacks():
    """conftest.run_bounded: past its bound the child is aborted and its Python stack shown."""
    sleep = [sys.executable, "-c", "import time\ndef wait():\n    time.sleep(60)\nwait()"]
    with pytest.raises(pytest.fail.Exception, match=r"ran past 2 s(.|\n)*in wait"):
        run_bounded(sleep, timeout=2)
    assert run_bounded([sys.executable, "-c", "print('ok')"], timeout=60).stdout == "ok\n"
