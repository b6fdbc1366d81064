"""A damaged metrics.jsonl or checksums.json (issue 28, items 4 and 5): each damage is injected,
seen to have landed, and then answered in one line naming the file: metrics rows that cannot be
read are dropped on resume, the file as found kept aside, and missing steps named; a
checksums.json that cannot be read refuses config.json and tokenizer.json (never switches
verification off) until `train` checks its config against the checkpoints and writes it again.
Library-level: no process is spawned, and only one test writes a (tiny, fake) checkpoint."""

import json
from pathlib import Path

import numpy as np
import pytest

from configs import dense
from mole_jax.errors import ConfigError
from mole_jax.train import loop
from mole_jax.train.checkpoint import Checkpointer
from mole_jax.train.metrics import MetricsWriter, read_metrics
from mole_jax.workdir import Workdir

STEPS = 20


def _metrics(w: Path, steps=range(1, STEPS + 1), eval_every: int = 10) -> Path:
    """A metrics.jsonl as a run writes it: a training row per step, an eval row every 10."""
    lines = []
    for s in steps:
        lines.append(json.dumps({"step": s, "loss": round(6 - s / 10, 4), "tokens_per_s": 1e3}))
        if s % eval_every == 0:
            lines.append(json.dumps({"step": s, "val_loss": 5.0, "val_ppl": 148.4}))
    path = w / "metrics.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _at(raw: bytes, step: int) -> int:
    """Where the training row of `step` starts."""
    return raw.index(b'{"step": %d, "loss"' % step)


def _resume(w: Path, capsys, step: int = STEPS) -> list[str]:
    """The writer a resume at `step` opens, two more rows written; the lines it printed."""
    writer = MetricsWriter(str(w), step)
    for s in (step + 1, step + 2):
        writer.write(s, {"loss": 1.0})
    writer.close()
    return capsys.readouterr().out.splitlines()


def _losses(w: Path) -> list[int]:
    return [r["step"] for r in read_metrics(str(w)) if "loss" in r]


def _flip(raw: bytes, at: int, bit: int) -> bytes:
    b = bytearray(raw)
    b[at] ^= 1 << bit
    return bytes(b)


# (name, damage, the steps whose training rows are lost, the warning's words, kept aside)
METRICS_DAMAGE = [
    ("flipped byte", lambda r: _flip(r, _at(r, 7) + 12, 1), [7], "line 7 (step 7)", True),
    ("non-UTF-8 byte", lambda r: _flip(r, _at(r, 12) + 20, 7), [12], "(step 12)", True),
    ("truncated in a row", lambda r: r[: _at(r, 7) + 15], range(7, 21), "steps 8-20", True),
    ("truncated at a row", lambda r: r[: _at(r, 7)], range(7, 21), "steps 7-20", False),
    ("middle block lost", lambda r: r[: _at(r, 7)] + r[_at(r, 15) :], range(7, 15), "7-14", False),
]


@pytest.mark.parametrize(
    "name,damage,lost,words,aside", METRICS_DAMAGE, ids=[c[0] for c in METRICS_DAMAGE]
)
def test_damaged_metrics_rows_are_named_on_resume(tmp_path, capsys, name, damage, lost, words,
                                                  aside):  # fmt: skip
    path = _metrics(tmp_path)
    before = path.read_bytes()
    path.write_bytes(damage(before))
    after = path.read_bytes()
    assert after != before  # the fault landed
    if name == "non-UTF-8 byte":
        with pytest.raises(UnicodeDecodeError):
            after.decode()
    elif name == "flipped byte":
        with pytest.raises(json.JSONDecodeError):
            json.loads(after.splitlines()[6])
    else:
        assert after.count(b"\n") < before.count(b"\n")

    out = _resume(tmp_path, capsys)
    (line,) = [x for x in out if x.startswith("warning:")]
    assert line.startswith(f"warning: {path}: ") and words in line, line
    assert _losses(tmp_path) == [s for s in range(1, STEPS + 3) if s not in lost]
    kept = tmp_path / "metrics.jsonl.damaged-1"
    assert kept.exists() == aside and (not aside or kept.read_bytes() == after)
    assert (f"kept as {kept}" in line) == aside

    _resume(tmp_path, capsys, STEPS + 2)  # later resumes: unreadable rows are never reported twice
    assert not (tmp_path / "metrics.jsonl.damaged-2").exists()


def test_a_clean_or_kill_cut_metrics_file_resumes_without_a_word(tmp_path, capsys):
    path = _metrics(tmp_path, range(1, 26))  # rows up to 25, the checkpoint at 20
    path.write_bytes(path.read_bytes() + b'{"step": 26, "lo')  # a row cut by a kill
    assert _resume(tmp_path, capsys) == []
    assert _losses(tmp_path) == list(range(1, 23))
    assert not (tmp_path / "metrics.jsonl.damaged-1").exists()


def test_sparse_logging_and_run_ends_are_no_gap(tmp_path, capsys):
    """log_every=10 with runs ending at 25 and 33: their end rows are no gap, nor are the steps
    between rows."""
    _metrics(tmp_path, [10, 20, 25, 30, 33, 40])
    assert _resume(tmp_path, capsys, 40) == []
    path = _metrics(tmp_path, [10, 20, 30, 40])
    raw = path.read_bytes()
    path.write_bytes(raw[: _at(raw, 30)] + raw[_at(raw, 40) :])
    (line,) = _resume(tmp_path, capsys, 40)
    assert "no rows for steps 21-39" in line


def test_read_metrics_skips_an_unreadable_row_in_one_line(tmp_path, capsys):
    path = _metrics(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(_flip(raw, _at(raw, 5) + 3, 7) + b'{"step": 21, "lo')
    assert _losses(tmp_path) == [s for s in range(1, STEPS + 1) if s != 5]
    (line,) = capsys.readouterr().out.splitlines()
    assert line == f"warning: {path}: skipped 1 unreadable row: line 5"


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).to_str()


def _workdir(tmp_path: Path):
    """config.json and tokenizer.json written as `train` writes them, with their checksums."""
    cfg = dense.get_config("size=tiny")
    wd = Workdir(tmp_path / "w")
    wd.path.mkdir()
    wd.save_config(cfg)
    wd.write_checked(wd.tokenizer_path, _tokenizer_json())
    return wd, cfg


def _edit_config(wd: Workdir) -> None:
    raw = json.loads(wd.config_path.read_text())
    raw["model"]["d_model"] *= 2
    wd.config_path.write_text(json.dumps(raw))


CHECKSUMS_DAMAGE = [
    ("truncated", lambda r: r[: len(r) // 2], "not valid JSON"),
    ("emptied", lambda r: b"", "(empty)"),
    ("not JSON", lambda r: r.replace(b"{", b"<", 1), "not valid JSON"),
    ("non-UTF-8", lambda r: r.replace(b'"', b'"\xff', 1), "not UTF-8 text"),
    ("a name flipped", lambda r: r.replace(b"config.json", b"conf)g.json"), "no entry for"),
    ("a digest cut", lambda r: r.replace(b'",', b'0",', 1), "not a map of file names"),
    ("a list", lambda r: b"[]", "not a map of file names"),
]


@pytest.mark.parametrize("name,damage,why", CHECKSUMS_DAMAGE, ids=[c[0] for c in CHECKSUMS_DAMAGE])
def test_damaged_checksums_refuse_config_and_tokenizer(tmp_path, name, damage, why):
    wd, _ = _workdir(tmp_path)
    sums = wd.path / "checksums.json"
    before = sums.read_bytes()
    sums.write_bytes(damage(before))
    assert sums.read_bytes() != before  # the fault landed
    _edit_config(wd)  # ... and a later edit of config.json must not be accepted
    for read in (lambda w: w.config, Workdir.editable_config, Workdir.tokenizer):
        if name == "a name flipped" and read is Workdir.tokenizer:
            continue  # its own entry is intact: tokenizer.json verifies
        with pytest.raises(ConfigError) as e:
            read(Workdir(wd.path))  # eval/export/generate, and `train --workdir=W` alone
        msg = str(e.value)
        assert msg.startswith(f"{sums} is damaged (") and why in msg, msg
        assert "\n" not in msg and "launch.py train --config=" in msg and "delete it" in msg


def test_checksums_intact_still_verify_and_legacy_workdirs_are_read(tmp_path):
    wd, _ = _workdir(tmp_path)
    assert Workdir(wd.path).config.model.d_model > 0
    Workdir(wd.path).tokenizer()
    _edit_config(wd)
    with pytest.raises(ConfigError, match="fails its checksum"):
        _ = Workdir(wd.path).config
    (wd.path / "checksums.json").unlink()  # a workdir written before checksums existed
    assert Workdir(wd.path).config.model.d_model > 0


def test_train_after_damaged_checksums_checks_the_checkpoints_then_verifies_again(tmp_path, capsys):
    """`train --config`: a config whose model differs from the checkpoints' is refused; the
    run's own config is written again, with checksums.json, and a later edit is refused."""
    wd, cfg = _workdir(tmp_path)
    ckpt = Checkpointer(wd, use_async=False, run_sha256=loop.run_digest(cfg))
    ckpt.save({"step": np.int32(STEPS), "params": {"w": np.zeros(4, np.float32)}})
    ckpt.close()
    sums = wd.path / "checksums.json"
    sums.write_bytes(sums.read_bytes()[:40])
    _edit_config(wd)
    assert json.loads(wd.config_path.read_text())["model"]["d_model"] != cfg.model.d_model

    other = dense.get_config("size=tiny")
    other.model.d_model *= 2  # what the edit says: not what the checkpoints hold
    with pytest.raises(ConfigError, match="checksums.json is damaged.*differ from the checkpo"):
        loop._check_resume_compatible(other, Workdir(wd.path))

    loop._check_resume_compatible(cfg, Workdir(wd.path))  # the run's config: it matches
    assert "warning:" in capsys.readouterr().out
    wd = Workdir(wd.path)
    wd.save_config(cfg)  # as write_workdir does next
    wd.write_checked(wd.tokenizer_path, _tokenizer_json())
    assert set(json.loads(sums.read_text())) == {"config.json", "tokenizer.json"}
    assert Workdir(wd.path).config.model.d_model == cfg.model.d_model
    _edit_config(wd)
    with pytest.raises(ConfigError, match="fails its checksum"):
        _ = Workdir(wd.path).config
