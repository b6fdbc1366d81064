"""Nothing lost, one line per mistake: the writer lock, preemption, the one rule for which
checkpoint, integrity of the whole train state, and `error:` lines for bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, tiny_overrides
from test_launch import cli_flags, launch, train_until

from configs import dense, mole
from mole_jax.errors import ConfigError
from mole_jax.infer.export import export_lut
from mole_jax.train import loop
from mole_jax.train.checkpoint import Checkpointer
from mole_jax.train.metrics import read_metrics
from mole_jax.workdir import Workdir

pytestmark = pytest.mark.slow


def one_error_line(proc, code=2) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def mole_run(tmp_path_factory, corpus_dir, cache_dir):
    """A tiny MoLE trained to step 20 (checkpoints 10 and 20), its LUT exported from step 20."""
    w = str(tmp_path_factory.mktemp("mole") / "w")
    cfg = tiny_overrides(mole.get_config("size=tiny,experts=2"), corpus_dir, cache_dir, steps=20)
    loop.run(cfg, w)
    export_lut(w, dtype="float32")
    return w


def _copy(run, tmp_path) -> str:
    w = str(tmp_path / "w")
    shutil.copytree(run, w)
    return w


def _largest(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip(path: Path, places: int = 1) -> None:
    """Flips a byte in the middle of `path`, or `places` bytes spread over it."""
    raw = bytearray(path.read_bytes())
    for i in range(places):
        raw[(2 * i + 1) * len(raw) // (2 * places)] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_second_writer_is_refused_naming_the_holder(mole_run, tmp_path, corpus_dir, cache_dir):
    fresh = str(tmp_path / "fresh")
    with Workdir(fresh).writer_lock("a test"):
        proc = launch("train", *cli_flags(corpus_dir, cache_dir), f"--workdir={fresh}", check=False)
        line = one_error_line(proc)
        assert f"pid {os.getpid()}" in line and "in use" in line
        assert not Path(fresh, "config.json").exists()
    w = _copy(mole_run, tmp_path)
    with Workdir(w).writer_lock("a test"):
        proc = launch("export", f"--workdir={w}", "--dtype=float16", check=False)
        assert f"pid {os.getpid()}" in one_error_line(proc)
        proc = launch("eval", f"--workdir={w}", "--max_tokens=1024", check=False)  # a reader
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (Path(w) / "lut_float16").exists()


def test_sigterm_checkpoints_the_current_step_and_resumes_on_the_curve(
    corpus_dir, cache_dir, tmp_path
):
    flags = cli_flags(corpus_dir, cache_dir) + [
        "--config.train.steps=60",
        "--config.train.ckpt_every=50",
    ]
    w = str(tmp_path / "w")
    proc = train_until(flags, w, 25, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "starting fresh" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "stopped by SIGTERM at step" in lines[0], err[-3000:]
    stopped = int(lines[0].split("at step ")[1].split(":")[0])
    assert 25 <= stopped < 50 and Checkpointer(w).steps() == [stopped]  # no periodic one yet
    again = launch("train", *flags, f"--workdir={w}")
    assert f"resuming from step {stopped} (of 60)" in again.stdout
    ref = str(tmp_path / "ref")
    cfg = tiny_overrides(dense.get_config("size=tiny"), corpus_dir, cache_dir, steps=60,
                         ckpt_every=50, eval_every=20)  # fmt: skip
    loop.run(cfg, ref)
    curve = lambda d: {r["step"]: r["loss"] for r in read_metrics(d) if "loss" in r}
    assert curve(w) == curve(ref)


def test_a_second_signal_ends_the_process_at_once(tmp_path):
    code = (
        "import os, signal, time\n"
        "from mole_jax.train.preempt import PreemptionGuard\n"
        "with PreemptionGuard() as g:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    assert g.signum == signal.SIGINT\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(5)\n"
        "print('not reached')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGINT and "not reached" not in proc.stdout, proc.stderr


@pytest.mark.parametrize("part", ["params", "train"])
def test_a_corrupt_newest_checkpoint_is_moved_aside_once_and_for_all(
    mole_run, tmp_path, corpus_dir, cache_dir, part
):
    """Parameters or optimiser state: each is verified by what reads it (eval reads only the
    parameters and model state, training everything); the bad step goes to <step>.corrupt in one
    line, without a traceback, and training retrains into its step without tripping over it."""
    w = _copy(mole_run, tmp_path)
    cfg = tiny_overrides(mole.get_config("size=tiny,experts=2"), corpus_dir, cache_dir, steps=30)
    loop.run(cfg, w)  # checkpoints 10, 20, 30
    _flip(_largest(Path(w) / "checkpoints" / "30" / part))
    proc = launch("eval", f"--workdir={w}", "--max_tokens=1024", check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if part == "params":
        assert "eval of step 20" in proc.stdout and "moved to" in proc.stdout
    else:
        assert "eval of step 30" in proc.stdout  # its parameters are intact
        proc = launch("train", *_mole_flags(cfg), f"--workdir={w}", check=False)
        assert "moved to" in proc.stdout and "resuming from step 20" in proc.stdout
    assert (Path(w) / "checkpoints" / "30.corrupt").is_dir()
    loop.run(cfg, w)  # retrains into step 30 (it used to fail with StepAlreadyExistsError)
    assert Checkpointer(w).steps()[-1] == 30
    assert "eval of step 30" in launch("eval", f"--workdir={w}", "--max_tokens=1024").stdout


def test_a_truncated_checkpoint_is_moved_aside_without_asyncio_noise(mole_run, tmp_path):
    """A truncated data file fails orbax's read while other reads are in flight; those finish
    after its event loop closed (each used to print an 'Event loop is closed' traceback)."""
    w = _copy(mole_run, tmp_path)
    data = _largest(Path(w) / "checkpoints" / "20" / "params")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
    proc = launch("eval", f"--workdir={w}", "--max_tokens=1024", check=False)
    assert proc.returncode == 0 and "moved to" in proc.stdout, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Event loop" not in proc.stderr, proc.stderr[-3000:]


def _mole_flags(cfg):
    """`launch.py` flags reproducing a tiny_overrides config of configs/mole.py."""
    d, t = cfg.data, cfg.train
    return [
        "--config=configs/mole.py:size=tiny,experts=2",
        f"--config.data.corpus={d.corpus}", f"--config.data.cache_dir={d.cache_dir}",
        f"--config.data.vocab_size={d.vocab_size}", f"--config.model.vocab_size={d.vocab_size}",
        f"--config.data.seq_len={d.seq_len}", f"--config.data.val_fraction={d.val_fraction}",
        f"--config.train.steps={t.steps}", f"--config.train.eval_every={t.eval_every}",
        f"--config.train.ckpt_every={t.ckpt_every}",
        f"--config.train.eval_batches={t.eval_batches}",
        "--config.train.async_ckpt=False",
    ]  # fmt: skip


def test_offloaded_eval_refuses_a_store_of_another_step(mole_run, tmp_path):
    w = _copy(mole_run, tmp_path)
    # bytes all over step 20's parameters (the resident ones among them); its LUT is step 20's
    _flip(_largest(Path(w) / "checkpoints" / "20" / "params"), places=64)
    proc = launch("eval", f"--workdir={w}", "--offload", check=False)
    assert "does not match the checkpoint" in one_error_line(proc)


def test_bad_generate_arguments_are_one_line(mole_run):
    for args, match in [
        (["--max_new=0"], "--max_new=0"),
        (["--max_new=-3"], "--max_new=-3"),
        (["--top_k=100000"], "--top_k=100000"),
        (["--top_k=-5"], "--top_k=-5"),
        (["--temperature=-1"], "--temperature=-1.0"),
        (["--max_new=abc"], "--max_new=abc"),
    ]:
        proc = launch("generate", f"--workdir={mole_run}", "--prompt=a", *args, check=False)
        assert match in one_error_line(proc), args
    # a prompt in Latin-1, not UTF-8: its byte arrives as a lone surrogate
    proc = launch("generate", f"--workdir={mole_run}", b"--prompt=caf\xe9", check=False)
    assert "--prompt is not UTF-8 text (byte 0xe9 at character 3)" in one_error_line(proc)


def test_resuming_with_fewer_steps_than_trained_is_refused_before_writing(mole_run, tmp_path):
    """The README's sequence: trained on to more steps with an override, then run again
    without it; refused in one line, config.json untouched. Resumed at its end, `train` says
    so and prints what it has."""
    w = _copy(mole_run, tmp_path)
    config = Path(w, "config.json").read_bytes()
    cfg = Workdir(w).editable_config()
    cfg.train.steps = 10
    with pytest.raises(ConfigError, match="trained to step 20, past train.steps=10"):
        loop.run(cfg, w)
    assert Path(w, "config.json").read_bytes() == config
    proc = launch("train", f"--workdir={w}", "--config.train.steps=10", check=False)
    assert "--config.train.steps=20 (or more)" in one_error_line(proc)
    proc = launch("train", f"--workdir={w}")
    assert "nothing left to train" in proc.stdout and "trained to step 20" in proc.stdout
    proc = launch("train", f"--workdir={w}", "--config.train.steps=22")  # the workdir's config
    assert "resuming from step 20 (of 22)" in proc.stdout and "trained to step 22" in proc.stdout
    assert Workdir(w).config.train.steps == 22


def _read_only(w: str, *args) -> subprocess.CompletedProcess:
    """`launch.py *args` with `w` read-only: by its mode, or (as root, whom modes do not stop)
    through a read-only bind mount in a private mount namespace."""
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), *args]
    if os.geteuid() != 0:
        for p in [Path(w), *Path(w).rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
    elif shutil.which("unshare") and subprocess.run(["unshare", "-m", "true"]).returncode == 0:
        mount = f'mount --bind {w} {w} && mount -o remount,bind,ro {w} && exec "$@"'
        cmd = ["unshare", "-m", "sh", "-c", mount, "sh", *cmd]
    else:
        pytest.skip("running as root without mount namespaces: cannot make a read-only dir")
    probe = subprocess.run([*cmd[: cmd.index(sys.executable)], "touch", f"{w}/probe"])
    assert probe.returncode != 0 and not Path(w, "probe").exists()  # the fault is in place
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def test_a_read_only_workdir_or_a_file_is_one_line_and_eval_prints_first(mole_run, tmp_path):
    w = _copy(mole_run, tmp_path)
    before = sorted((str(p), p.stat().st_size) for p in Path(w).rglob("*"))
    proc = _read_only(w, "eval", f"--workdir={w}", "--offload", "--max_tokens=512")
    assert "eval of step 20: loss" in proc.stdout  # the result, before failing to save it
    assert f"{w}/eval" in one_error_line(proc) and "writable" in proc.stderr
    for args in (["export", "--dtype=float16"], ["train", "--config.train.steps=22"]):
        proc = _read_only(w, *args, f"--workdir={w}")
        assert "Read-only file system" in one_error_line(proc), args
    assert sorted((str(p), p.stat().st_size) for p in Path(w).rglob("*")) == before
    afile = tmp_path / "afile"
    afile.write_text("x")
    for args in (["export"], ["train", *_mole_flags(Workdir(mole_run).config)]):
        proc = launch(*args, f"--workdir={afile}", check=False)
        assert "not a directory" in one_error_line(proc), args
    assert afile.read_text() == "x"


NO_SPACE_CHECK = """import sys
sys.argv = ["launch.py", *sys.argv[1:]]
from mole_jax.train import checkpoint
checkpoint.check_space = lambda *a, **k: None  # the disk fills after the check, as by another
from mole_jax.cli.main import cli
cli()
"""

FILL_THEN_FREE = """set -e
MNT="$1"; shift
mount -t tmpfs -o size=3m tmpfs "$MNT"
set +e; "$@" > "$OUT/full.out" 2> "$OUT/full.err"; echo $? > "$OUT/full.rc"; set -e
mount -o remount,size=256m "$MNT"
"""


def test_a_disk_filling_during_a_checkpoint_is_one_line_and_a_rerun_resumes(
    tmp_path, corpus_dir, cache_dir
):
    """A tmpfs of 3 MB fills while orbax writes the first checkpoint (the free-space check is
    bypassed, as when another process fills the disk after it): one `error:` line, no
    traceback; with space again, the same command resumes and finishes on the curve."""
    if os.geteuid() != 0 or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("needs root and mount namespaces to mount a small tmpfs")
    cfg = tiny_overrides(mole.get_config("size=tiny,experts=2"), corpus_dir, cache_dir, steps=6)
    cfg.train.update(ckpt_every=3, eval_every=6)
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir(), out.mkdir()
    (tmp_path / "nocheck.py").write_text(NO_SPACE_CHECK)
    train = ["train", *_mole_flags(cfg), f"--workdir={mnt}/w"]
    script = FILL_THEN_FREE + (
        f'"{sys.executable}" {ROOT}/launch.py {" ".join(train)} > "$OUT/again.out" '
        f'2> "$OUT/again.err"; echo $? > "$OUT/again.rc"; cp "{mnt}/w/metrics.jsonl" "$OUT/"'
    )
    cmd = ["unshare", "-m", "sh", "-c", script, "sh", str(mnt),
           sys.executable, str(tmp_path / "nocheck.py"), *train]  # fmt: skip
    env = dict(os.environ, OUT=str(out), PYTHONPATH=str(ROOT))
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=600)
    err = (out / "full.err").read_text()
    assert (out / "full.rc").read_text().strip() == "2", err[-3000:]
    assert err.strip().splitlines() == [err.strip()] and "the disk is full" in err  # one line
    assert (out / "again.rc").read_text().strip() == "0", (out / "again.err").read_text()[-3000:]
    reference = tmp_path / "reference"
    loop.run(cfg, str(reference))
    got = {r["step"]: r["loss"] for r in read_metrics(str(out)) if "loss" in r}
    want = {r["step"]: r["loss"] for r in read_metrics(str(reference)) if "loss" in r}
    assert got == want


def test_bad_corpora_are_one_line(tmp_path, cache_dir):
    cases = {
        "empty.txt": (b"", "no documents|fewer than"),
        "latin1.txt": ("caf\xe9 na\xefve " * 50).encode("latin-1"),
        "bad.jsonl": (b'{"text": "fine"}\n{"text": broken\n', "cannot be read"),
    }
    cases["latin1.txt"] = (cases["latin1.txt"], "cannot be read")
    for name, (raw, match) in cases.items():
        d = tmp_path / name.replace(".", "_")
        d.mkdir()
        (d / name).write_bytes(raw)
        (d / ("other" + Path(name).suffix)).write_bytes(raw)
        proc = launch(
            "train", "--config=configs/dense.py:size=tiny", f"--config.data.corpus=files:{d}/*",
            f"--config.data.cache_dir={cache_dir}", f"--workdir={tmp_path / 'w'}", check=False,
        )  # fmt: skip
        line = one_error_line(proc)
        assert any(m in line for m in match.split("|")), (name, line)
        assert not (tmp_path / "w" / "config.json").exists()


def test_any_suffix_with_an_explicit_format_and_a_single_file(tmp_path, corpus_dir, cache_dir):
    data = tmp_path / "notes.log"
    data.write_text("\n".join(json.dumps({"text": p.read_text()}) for p in corpus_dir.glob("*")))
    flags = cli_flags(corpus_dir, cache_dir) + [f"--config.data.corpus=files:{data}"]
    proc = launch("train", *flags, f"--workdir={tmp_path / 'w'}", check=False)
    assert "data.format=text|jsonl|parquet" in one_error_line(proc)
    launch("train", *flags, "--config.data.format=jsonl", "--config.train.steps=2",
           f"--workdir={tmp_path / 'w'}")  # fmt: skip


def test_eval_covers_the_whole_split_or_max_tokens(mole_run, corpus_dir):
    whole = launch("eval", f"--workdir={mole_run}").stdout
    capped = launch("eval", f"--workdir={mole_run}", "--max_tokens=1024").stdout
    tokens = lambda out: int(out.split(" over ")[1].split()[0])
    assert tokens(capped) == 1024 and tokens(whole) > 8192
    one_file = sorted(corpus_dir.glob("*.txt"))[0]
    proc = launch("eval", f"--workdir={mole_run}", f"--data=files:{one_file}", check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


STUDY = '''"""A study that fails."""
from ml_collections import ConfigDict
def get_config(arg=None):
    return ConfigDict(dict(steps=1))
def get_sweep(c):
    {body}
'''


@pytest.mark.parametrize(
    "body,match", [("return [", "SyntaxError|never closed"), ("raise RuntimeError('no')", "no")]
)
def test_a_broken_study_is_one_line(tmp_path, body, match):
    path = tmp_path / "study.py"
    path.write_text(STUDY.format(body=body))
    proc = launch("sweep", f"--config={path}", f"--workdir={tmp_path / 'w'}", check=False)
    line = one_error_line(proc)
    assert any(m in line for m in match.split("|")), line
    assert not (tmp_path / "w").exists()
