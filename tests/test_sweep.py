"""`launch.py sweep`: every shipped study plans; a two-run study trains, exports, evaluates,
is skipped when finished, reports a run that fails; bad studies are refused before anything runs."""

import ast
import json
import os
from pathlib import Path

import pytest
from conftest import ROOT
from test_launch import launch

from mole_jax.errors import ConfigError, UserError
from mole_jax.sweeps import runner
from mole_jax.sweeps.report import plan_table


def _defines_get_sweep(path: Path) -> bool:
    """A top-level `def get_sweep` (not one inside a string, as faults.py writes a study)."""
    body = ast.parse(path.read_text()).body
    return any(isinstance(n, ast.FunctionDef) and n.name == "get_sweep" for n in body)


# Every study in experiments/: a new study is tested here without being registered.
STUDIES = sorted(p.stem for p in (Path(ROOT) / "experiments").glob("*.py") if _defines_get_sweep(p))


def test_every_study_takes_the_task_pack_as_a_knob(tmp_path, monkeypatch):
    """`tasks=...` on any study scores every run on those tasks; without it no run is scored
    (so finished runs keep their spec and are skipped)."""
    monkeypatch.chdir(ROOT)
    for name in STUDIES:
        module = runner.load_study(f"experiments/{name}.py")
        with_tasks = module.get_sweep(module.get_config("tasks=mole_offline"))
        assert all(r.get("tasks") == ["mole_offline"] for r in with_tasks), name
        default = module.get_config(None).tasks  # the zero-shot study scores by default
        assert all(r.get("tasks", []) == [t for t in default.split("/") if t]
                   for r in module.get_sweep(module.get_config(None))), name  # fmt: skip
    module = runner.load_study("experiments/aux_losses.py")
    runs = runner.plan(module, module.get_config("tasks=mole_offline"), str(tmp_path))
    assert all(r.spec["tasks"] == ["mole_offline"] for r in runs)


@pytest.mark.parametrize("name", STUDIES)
def test_every_shipped_study_plans_and_validates(name, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # studies name their configs relative to the repository
    path = f"experiments/{name}.py"
    module = runner.load_study(path)
    assert module.__doc__ and "Question" in module.__doc__ and "Expected" in module.__doc__
    runs = runner.plan(module, module.get_config(None), str(tmp_path))
    assert len({r.name for r in runs}) == len(runs) >= 1
    table = plan_table(runs)
    assert all(f"| {r.name} |" in table for r in runs)
    assert not os.listdir(tmp_path)  # planning writes nothing


def _settings(corpus_dir, cache_dir) -> dict:
    return {
        "data.corpus": f"files:{corpus_dir}/*.txt",
        "data.cache_dir": cache_dir,
        "data.vocab_size": 512,
        "model.vocab_size": 512,
        "data.seq_len": 32,
        "data.val_fraction": 0.2,
        "train.batch_size": 8,
        "train.eval_batches": 2,
        "train.progress": False,
        "train.async_ckpt": False,
    }


STUDY = """\"\"\"A test study.\"\"\"
from ml_collections import ConfigDict

S = {settings!r}


def get_config(arg=None):
    return ConfigDict(dict(steps=6, d_model=64))


def get_sweep(c):
    s = dict(S, **{{"train.steps": c.steps}})
    return {runs}


def report(rows):
    return "report: " + ",".join(r["name"] for r in rows)
"""


def write_study(path, settings: dict, runs: str) -> str:
    path.write_text(STUDY.format(settings=settings, runs=runs))
    return str(path)


TWO_RUNS = """[
    dict(name="dense", config="configs/dense.py:size=tiny",
         set=dict(s, **{"model.d_model": c.d_model})),
    dict(name="mole", config="configs/mole.py:size=tiny,experts=2", set=s,
         evals=[dict(name="fp16", export="float16")], tasks=["mole_next_line"], task_limit=4),
]"""


@pytest.mark.slow
def test_a_submitit_job_array_runs_and_skips_like_local_runs(corpus_dir, cache_dir, tmp_path):
    """submitit's local executor (the code path of --executor=slurm, on this machine) starts,
    records and skips runs as the local one does (the same `write_spec` / `report_finished`)."""
    one = '[dict(name="dense", config="configs/dense.py:size=tiny", set=s)]'
    study = write_study(tmp_path / "study.py", _settings(corpus_dir, cache_dir), one)
    w, ex = tmp_path / "sweep", "--executor=submitit_local"
    launch("sweep", f"--config={study}", f"--workdir={w}", ex)
    assert len(os.listdir(w / "submitit")) >= 1  # submitit's own logs
    out = json.loads((w / "sweep.json").read_text())
    assert out["complete"] and out["rows"][0]["steps"] == 6
    assert launch("sweep", f"--config={study}", f"--workdir={w}", ex).stdout.count("skipped") == 1


@pytest.mark.slow
def test_sweep_trains_evaluates_skips_and_reports_failures(corpus_dir, cache_dir, tmp_path):
    """Subprocesses here (--executor=local): trained, exported, evaluated, scored; skipped when
    finished; a failed run is one line and leaves the sweep incomplete."""
    study = write_study(tmp_path / "study.py", _settings(corpus_dir, cache_dir), TWO_RUNS)
    w = tmp_path / "sweep"
    ex = "--executor=local"
    launch("sweep", f"--config={study}", f"--workdir={w}", "--parallel=2", ex)
    out = json.loads((w / "sweep.json").read_text())
    assert out["complete"] and [r["name"] for r in out["rows"]] == ["dense", "mole"]
    dense, mole = out["rows"]
    assert dense["steps"] == mole["steps"] == 6 and dense["tokens_trained"] == 6 * 8 * 32
    assert (
        dense["params_total"]
        == json.loads((w / "dense/model_summary.json").read_text())["params_total"]
    )
    fp16 = mole["evals"]["fp16"]
    assert fp16["mode"] == "offload" and fp16["lut_dtype"] == "float16"
    assert abs(fp16["loss"] - mole["val_loss"]) < 1e-4  # the offloaded LUT equals the model
    assert (w / "mole/lut_float16/manifest.json").exists()
    # the run's tasks, scored on the trained model and on the fp16 LUT read from storage
    model, lut = (mole["tasks"][e]["tasks"]["mole_next_line"] for e in ("model", "fp16"))
    assert 0 <= model["acc"] <= 1 and model["acc"] == lut["acc"] and "acc_stderr" in model
    items = [mole["tasks"][e]["items"]["mole_next_line"] for e in ("model", "fp16")]
    assert len(items[0]) == 4 and items[0] == items[1]  # per document: the verdicts pair them
    assert mole["tasks"]["model"]["requests"] == 4 * 4 and not dense.get("tasks")
    md = (w / "results.md").read_text()
    assert "| dense |" in md and "report: dense,mole" in md and "Incomplete" not in md
    assert "next_line acc |" in md and "next_line acc (fp16) |" in md
    assert (w / "curves.png").stat().st_size > 0

    logs = {n: (w / n / "sweep.log").stat().st_size for n in ("dense", "mole")}
    again = launch("sweep", f"--config={study}", f"--workdir={w}", ex)
    assert again.stdout.count("skipped") == 2
    assert logs == {n: (w / n / "sweep.log").stat().st_size for n in ("dense", "mole")}

    # A new d_model for the dense run: its workdir holds another model, so that run fails.
    bad = launch(
        "sweep", f"--config={study}", f"--workdir={w}", "--config.d_model=32", ex, check=False
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: 1 of 2 run(s) failed (dense)")
    assert "dense: FAILED" in bad.stdout and "model.d_model=64" in bad.stdout
    out = json.loads((w / "sweep.json").read_text())
    assert not out["complete"] and out["rows"][1]["status"] == "skipped"
    assert "Incomplete" in (w / "results.md").read_text()
    assert not (w / "dense/sweep_result.json").exists()  # the old spec's result is gone


BAD_RUNS = [
    ('[dict(name="a", config="configs/dense.py:size=tiny", set=s)] * 2', "two runs"),
    ('[dict(name="a", config="configs/nope.py:size=tiny", set=s)]', "does not exist"),
    ('[dict(name="a", config="configs/dense.py:size=tiny", set=dict(s, x=1))]', "'x'"),
    ('[dict(name="a", config="configs/dense.py:size=tiny", sett=s)]', "unknown key"),
    ('[dict(name="a/b", config="configs/dense.py:size=tiny", set=s)]', "directory name"),
    ('[dict(name="a", config="configs/dense.py:size=tiny", set=dict(s, **{"model.n_heads": 5}))]',
     "n_heads"),
    ('[dict(name="a", config="configs/moe.py:size=tiny,experts=2,topk=3", set=s)]', "topk"),
    ('[dict(name="a", config="configs/dense.py:size=tiny", set=s, '
     'evals=[dict(name="e", export="float16")])]', "lookup table"),
    ('[dict(name="a", config="configs/mole.py:size=tiny", set=s, '
     'evals=[dict(name="e", export="fp8")])]', "fp8"),
    ('[dict(name="a", config="configs/mole.py:size=tiny", set=s, '
     'evals=[dict(name="e", mode="offload")])]', "export=<dtype>"),
    ('[dict(name="a", config="configs/dense.py:size=tiny", set=s, tasks=["arc_easy"])]',
     "need the Hugging Face hub"),
    ('[dict(name="a", config="configs/dense.py:size=tiny", set=s, tasks="mole_offline")]',
     "list of lm-eval task names"),
    ("[]", "no runs"),
]  # fmt: skip


@pytest.mark.parametrize("runs,message", BAD_RUNS)
def test_bad_study_is_refused_before_anything_runs(runs, message, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    study = write_study(tmp_path / "study.py", {}, runs)
    module = runner.load_study(study)
    w = tmp_path / "sweep"
    with pytest.raises(ConfigError, match=message) as e:
        runner.run_sweep(study, module.get_config(), str(w))
    assert "\n" not in str(e.value)
    assert not w.exists()


def test_study_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        runner.load_study(str(tmp_path / "missing.py"))
    (tmp_path / "s.py").write_text("def get_config(arg=None):\n    return None\n")
    with pytest.raises(UserError, match="get_sweep"):
        runner.load_study(str(tmp_path / "s.py"))


@pytest.mark.slow
def test_a_preempted_slurm_task_checkpoints_and_its_requeue_resumes(
    corpus_dir, cache_dir, tmp_path
):
    """submitit's preemption hook (`SweepJob.checkpoint`): the worker checkpoints its step on
    SIGTERM, and the requeued submission resumes the run from there to its result."""
    import threading

    from mole_jax.sweeps.slurm import SweepJob
    from mole_jax.train.checkpoint import Checkpointer

    settings = dict(_settings(corpus_dir, cache_dir), **{"train.ckpt_every": 1000})
    one_run = (
        '[dict(name="d", config="configs/dense.py:size=tiny", set=dict(s, **{"train.steps": 400}))]'
    )
    module = runner.load_study(write_study(tmp_path / "study.py", settings, one_run))
    runs = runner.plan(module, module.get_config(), str(tmp_path))
    spec = runner.write_spec(runs[0])
    job, codes = SweepJob(), []
    thread = threading.Thread(target=lambda: codes.append(job(spec)))
    thread.start()
    metrics = Path(runs[0].dir) / "metrics.jsonl"
    while thread.is_alive() and not (metrics.exists() and len(metrics.read_text().split()) >= 3):
        thread.join(0.1)
    requeue = job.checkpoint(spec)
    thread.join()
    assert codes == [143]  # stopped by SIGTERM, after checkpointing its step
    (stopped,) = Checkpointer(runs[0].dir).steps()
    assert 0 < stopped < 400
    assert requeue.args == (spec,) and isinstance(requeue.function, SweepJob)
    assert requeue.function(*requeue.args) == 0
    assert json.loads((Path(runs[0].dir) / "sweep_result.json").read_text())["steps"] == 400
    log = (Path(runs[0].dir) / "sweep.log").read_text()
    assert f"resuming from step {stopped} (of 400)" in log


def test_seeds_expand_a_run_and_the_report_gives_mean_and_spread(tmp_path, monkeypatch):
    """(The verdicts over seeds are mole_jax/sweeps/stats.py's: tests/test_stats.py.)"""
    from mole_jax.sweeps.report import seed_table

    monkeypatch.chdir(ROOT)
    runs = '[dict(name="m", config="configs/dense.py:size=tiny", set=s, seeds=3)]'
    module = runner.load_study(write_study(tmp_path / "study.py", {}, runs))
    planned = runner.plan(module, module.get_config(), str(tmp_path))
    assert [r.name for r in planned] == ["m-s0", "m-s1", "m-s2"]
    assert [r.cfg.seed for r in planned] == [0, 1, 2] and {r.group for r in planned} == {"m"}
    rows = [dict(name=f"{g}-s{i}", group=g, val_loss=v, evals={})
            for g, vals in (("a", [5.0, 5.1, 5.2]), ("b", [5.3, 5.4, 5.5]))
            for i, v in enumerate(vals)]  # fmt: skip
    table = seed_table(rows)
    assert "| a | 3 | 5.1000 ± 0.1000 |" in table and "| b | 3 | 5.4000 ± 0.1000 |" in table
    with pytest.raises(ConfigError, match="seeds or set seed"):
        bad = '[dict(name="m", config="configs/dense.py:size=tiny", set=dict(s, seed=1), seeds=2)]'
        module = runner.load_study(write_study(tmp_path / "b.py", {}, bad))
        runner.plan(module, module.get_config(), str(tmp_path))


@pytest.mark.parametrize("name", STUDIES)
def test_every_study_report_reads_rows_of_its_own_plan(name, tmp_path, monkeypatch):
    """Each study's report(rows) on made-up finished rows shaped like its plan's (values from a
    seeded generator): it runs and returns text. The numbers mean nothing; the shape does."""
    import numpy as np

    monkeypatch.chdir(ROOT)
    module = runner.load_study(f"experiments/{name}.py")
    if not hasattr(module, "report"):
        pytest.skip("no report")
    rng = np.random.default_rng(0)
    tasks = ("mole_next_line", "mole_last_word", "mole_ppl")
    rows = []
    for r in runner.plan(module, module.get_config(None), str(tmp_path)):
        spec = r.spec
        scored = {
            "tasks": {t: {"acc": rng.random(), "acc_stderr": 0.01, "word_perplexity": 9.0}
                      for t in tasks},
            "seconds": 2.0, "requests": 100,
        }  # fmt: skip
        row = dict(
            name=r.name, val_loss=5 + rng.random(), loss=5.0, steps=1, tokens_trained=1,
            evals={e["name"]: {"loss": 5 + rng.random(), "bytes_per_token": 8}
                   for e in spec["evals"]},
            **({"group": r.group} if r.group else {}),
        )  # fmt: skip
        if spec.get("tasks"):
            row["tasks"] = {e: scored for e in ["model", *(e["name"] for e in spec["evals"])]}
        rows.append(row)
    assert isinstance(module.report(rows), str)


def test_isoflop_seeds_the_chosen_widths_and_judges_each_step_of_the_papers_order(monkeypatch):
    """seeds=3, seed_scales=0.5 adds `-s1`, `-s2` runs (seed 1, 2) of the x0.5 width only; the
    declared claims judge PEER < MoE-EC < PKM < dense step by step at that width (paired over
    its seeds, Holm over the steps)."""
    from mole_jax.sweeps import claims

    monkeypatch.chdir(ROOT)
    iso = runner.load_study("experiments/isoflop.py")
    c = iso.get_config("size=tiny,budgets=1e12,scales=0.5/1,seeds=3,seed_scales=0.5")
    runs = {r["name"]: r for r in iso.get_sweep(c)}
    assert len(runs) == 5 * (3 + 1)
    assert runs["peer-1.0e12-x0.5-s2"]["set"]["seed"] == 2
    assert "seed" not in runs["peer-1.0e12-x0.5"]["set"] and "peer-1.0e12-x1.0-s1" not in runs
    declared = iso.CLAIMS(c)
    assert [(x.better, x.worse) for x in declared] == [
        ("peer-1.0e12-x0.5", "moe-ec-1.0e12-x0.5"), ("moe-ec-1.0e12-x0.5", "pkm-1.0e12-x0.5"),
        ("pkm-1.0e12-x0.5", "dense-1.0e12-x0.5")]  # fmt: skip
    # x0.5: the paper's order 0.1 apart, seed offsets that differ by kind (a paired design)
    base = {"peer": 5.0, "moe-ec": 5.1, "pkm": 5.2, "dense": 5.3, "moe": 5.15}
    rows = []
    for name, r in runs.items():
        kind, _, width = iso._parse(name)
        seed = r["set"].get("seed", 0)
        off = 0.01 * seed * (1 + 0.3 * list(base).index(kind))
        rows.append(dict(name=name, set=r["set"], val_loss=base[kind] + off))
    got = claims.verdicts(rows, declared)
    assert all(": reproduced —" in v and "3 shared seeds" in v for v in got), got
    # the order broken at one step: MoE-EC above PKM by 0.1
    rows = [dict(r, val_loss=r["val_loss"] + (0.2 if r["name"].startswith("moe-ec") else 0))
            for r in rows]  # fmt: skip
    got = claims.verdicts(rows, declared)
    assert ": contradicted —" in got[1] and ": reproduced —" in got[0] + got[2], got
    assert "order" in iso.report(rows)  # the exploratory reading still runs
