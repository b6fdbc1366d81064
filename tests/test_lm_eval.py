"""The lm-eval adapter: scores equal the model's own forward, rolling log-likelihood equals the eval
loss on the same tokens, offloaded LUT scores equal in-memory ones, greedy generate_until equals
`launch.py generate`, and hub tasks are refused offline in one line."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_bounded, synthetic_text, trained_workdir

pytest.importorskip("lm_eval")  # the [eval] extra; `make test` installs it

from configs import mole  # noqa: E402
from mole_jax.data import pipeline  # noqa: E402
from mole_jax.eval.validation import evaluate_engine  # noqa: E402
from mole_jax.infer.engine import build_engine  # noqa: E402
from mole_jax.infer.export import export_lut  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


@pytest.fixture(scope="module")
def mole_run(tmp_path_factory, corpus_dir, cache_dir):
    w = trained_workdir(
        tmp_path_factory, mole.get_config("size=tiny,experts=4"), corpus_dir, cache_dir
    )
    export_lut(w, dtype="float32")
    return w


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory):
    """A multiple-choice task the test writes itself: complete a sentence of the test corpus."""
    d = tmp_path_factory.mktemp("tasks")
    rng = np.random.default_rng(0)
    lines = synthetic_text(99, 40).splitlines()
    rows = []
    for i, line in enumerate(lines[:12]):
        words = line.split(" ")
        others = [lines[j].split(" ")[-2:] for j in rng.choice(len(lines), 3, replace=False)]
        choices = [" ".join(words[-2:])] + [" ".join(o) for o in others]
        rows.append(dict(context=" ".join(words[:-2]), choices=choices, label=0, id=i))
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "utils.py").write_text(
        textwrap.dedent("""
        from pathlib import Path
        import datasets
        def mc(**kwargs):
            path = str(Path(__file__).parent / "mc.jsonl")
            return datasets.DatasetDict({"test": datasets.Dataset.from_json(path)})
    """)
    )
    (d / "local_mc.yaml").write_text(
        textwrap.dedent("""
        task: local_mc
        custom_dataset: !function utils.mc
        output_type: multiple_choice
        test_split: test
        doc_to_text: "{{context}}"
        doc_to_choice: "{{choices}}"
        doc_to_target: label
        metric_list:
          - metric: acc
        metadata:
          version: 1.0
    """)
    )
    return d


def _evaluate(workdir, include: Path, mode="experts", batch_size=16):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from mole_jax.eval.harness import MoleJaxLM

    lm = MoleJaxLM(workdir, mode=mode, batch_size=batch_size)
    manager = TaskManager(include_path=str(include), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=["local_mc"], task_manager=manager, log_samples=True, bootstrap_iters=0
    )
    return out, lm


def _direct_loglik(engine, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) from one unpadded forward of the engine."""
    ctx = pipeline.tokenize(tok, context)
    whole = pipeline.tokenize(tok, context + continuation)
    ids = np.asarray([whole[:-1]], np.int32)
    logits, _ = engine.forward(ids)
    z = np.asarray(logits[0], np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    targets = whole[1:]
    return float(sum(logp[t, targets[t]] for t in range(len(ctx) - 1, len(whole) - 1)))


def test_multiple_choice_scores_equal_the_models_own_forward(mole_run, local_tasks):
    out, lm = _evaluate(mole_run, local_tasks)
    engine, tok = build_engine(mole_run), lm.tokenizer_
    correct = []
    for sample in out["samples"]["local_mc"]:
        doc = sample["doc"]
        got = [float(r[0][0]) for r in sample["resps"]]
        want = [_direct_loglik(engine, tok, doc["context"], " " + c) for c in doc["choices"]]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        correct.append(int(np.argmax(want)) == doc["label"])
    assert out["results"]["local_mc"]["acc,none"] == pytest.approx(np.mean(correct), abs=1e-12)
    assert lm.requests == 4 * len(correct)
    # batch of one (no padding rows, other buckets) gives the same scores
    out1, _ = _evaluate(mole_run, local_tasks, batch_size=1)
    for a, b in zip(out["samples"]["local_mc"], out1["samples"]["local_mc"], strict=True):
        np.testing.assert_allclose(
            [r[0][0] for r in a["resps"]], [r[0][0] for r in b["resps"]], rtol=1e-5, atol=1e-5
        )


class _Request:
    def __init__(self, *args):
        self.args = args


def test_rolling_loglikelihood_equals_the_eval_loss_times_tokens(mole_run):
    from mole_jax.eval.harness import MoleJaxLM

    lm = MoleJaxLM(mole_run)
    tok, L = lm.tokenizer_, lm.max_length
    full = pipeline.tokenize(tok, synthetic_text(7, 60))
    for k in range(6, 2, -1):  # a text that tokenizes to exactly k windows of L tokens
        text = pipeline.detokenize(tok, full[: k * L])
        tokens = pipeline.tokenize(tok, text)
        if len(tokens) == k * L:
            break
    else:
        pytest.skip("no prefix of the text re-tokenizes to whole windows")
    (rolling,) = lm.loglikelihood_rolling([_Request(text)])
    # `launch.py eval`'s computation (evaluate_engine) on the stream [EOS] + tokens: windows of
    # L + 1 tokens, L predicted; one window at a time, so that each window's sum keeps its digits
    stream = np.asarray([lm.eot_token_id, *tokens])
    engine = build_engine(mole_run)
    per_window = [evaluate_engine(engine, [w]) for w in pipeline.val_windows(stream, 1, L, k)]
    assert sum(r["tokens"] for r in per_window) == k * L
    total = -sum(r["loss"] * r["tokens"] for r in per_window)
    assert abs(rolling - total) <= 1e-4 * k, (rolling, total)


def test_offloaded_fp32_lut_scores_equal_in_memory(mole_run, local_tasks):
    mem, _ = _evaluate(mole_run, local_tasks)
    off, lm = _evaluate(mole_run, local_tasks, mode="offload")
    for a, b in zip(mem["samples"]["local_mc"], off["samples"]["local_mc"], strict=True):
        np.testing.assert_allclose(
            [r[0][0] for r in a["resps"]], [r[0][0] for r in b["resps"]], rtol=1e-5, atol=1e-5
        )
    assert mem["results"]["local_mc"]["acc,none"] == off["results"]["local_mc"]["acc,none"]
    assert lm.usage()["bytes_read_per_token"] > 0


def test_greedy_generate_until_equals_launch_generate(mole_run):
    from mole_jax.eval.harness import MoleJaxLM

    prompt = "The bold king"
    proc = subprocess.run(
        [sys.executable, "launch.py", "generate", f"--workdir={mole_run}", f"--prompt={prompt}",
         "--max_new=10"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    expected = proc.stdout.rstrip("\n").removeprefix(prompt)
    lm = MoleJaxLM(mole_run)
    (got,) = lm.generate_until([_Request(prompt, {"until": ["<never>"], "max_gen_toks": 10})])
    assert got == expected
    if len(expected.strip()) > 1:  # stopping at a string cuts the text just before it
        stop = expected.strip()[1]
        (cut,) = lm.generate_until([_Request(prompt, {"until": [stop], "max_gen_toks": 10})])
        assert cut == expected[: expected.index(stop)]


def _launch(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "launch.py", *args]
    return run_bounded(cmd, timeout=240, env=env)


def test_a_hub_task_offline_is_one_error_line(mole_run):
    proc = _launch("eval", f"--workdir={mole_run}", "--tasks=arc_easy")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
    assert "hub" in lines[0] and "--tasks=mole_offline" in lines[0]
    assert not Path(mole_run, "eval", "tasks.json").exists()


def test_launch_eval_tasks_writes_scores_and_the_lm_eval_cli_runs(mole_run, tmp_path):
    proc = _launch(
        "eval", f"--workdir={mole_run}", "--tasks=mole_offline", "--limit=6", "--offload"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(Path(mole_run, "eval", "tasks_offload.json").read_text())
    assert set(rec["tasks"]) >= {"mole_next_line", "mole_last_word", "mole_ppl"}
    assert 0 <= rec["tasks"]["mole_next_line"]["acc"] <= 1
    assert "acc_stderr" in rec["tasks"]["mole_next_line"]
    for task in ("mole_next_line", "mole_last_word"):  # each document's score, for paired tests
        items = rec["items"][task]
        assert len(items) == 6 and set(items) <= {0.0, 1.0}
        assert sum(items) / 6 == pytest.approx(rec["tasks"][task]["acc"])
    assert rec["mode"] == "offload" and rec["lut_dtype"] == "float32"
    assert rec["bytes_read_per_token"] > 0 and rec["requests"] == 6 * 4 + 6 + 6
    cli = run_bounded(
        [sys.executable, "-m", "mole_jax.eval.harness_cli", "run", "--model", "mole_jax",
         "--model_args", f"workdir={mole_run}", "--tasks", "mole_next_line", "--limit", "4",
         "--output_path", str(tmp_path / "out")],
        timeout=240, env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"),
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "mole_next_line" in cli.stdout
