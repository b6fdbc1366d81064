"""Every shipped study declares the paper's claims it tests (`CLAIMS` in its file, naming runs its
own plan makes), and the verdicts the docs print from the shipped results use only the declared
words: reproduced, contradicted, not resolved at this scale (or no verdict without a spread) —
never "agrees" or "inside the spread" for a result that is not resolved."""

import ast
import json
import os
import re
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from mole_jax.sweeps import claims
from mole_jax.sweeps.claims import Claim, Trend

sys.path.insert(0, os.path.join(ROOT, "experiments"))

from _tables import verdicts  # noqa: E402

EXPERIMENTS = Path(ROOT) / "experiments"
RESULTS = EXPERIMENTS / "results" / "studies"
LINE = re.compile(r"^(.+): (reproduced|contradicted|not resolved at this scale|no verdict) — ")


def _defines_get_sweep(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return any(isinstance(n, ast.FunctionDef) and n.name == "get_sweep" for n in body)


STUDIES = sorted(p.stem for p in EXPERIMENTS.glob("*.py") if _defines_get_sweep(p))
SHIPPED = sorted(p.parent.name for p in RESULTS.glob("*/sweep.json"))
CONVERT = "convert=convert_vs_pruned_small.json+convert_vs_pruned_small_s1.json"


def _groups(runs: list[dict]) -> set[str]:
    """The groups a plan makes: a run with `seeds` is one group under its name, any other run
    is its own (a run seeded by hand, `<name>-s<i>`, joins `<name>` when verdicts are computed)."""
    return {r["name"] for r in runs}


def _names(c) -> list[str]:
    return [c.better, c.worse] if isinstance(c, Claim) else [g for g, _ in c.points]


def test_the_studies_are_found():
    assert {"aux_losses", "isoflop", "num_experts", "zero_shot", "seeds"} <= set(STUDIES)


@pytest.mark.parametrize("name", STUDIES)
def test_every_study_declares_its_claims_on_runs_it_plans(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    module = verdicts.study_module(f"experiments/{name}.py")
    assert hasattr(module, "CLAIMS"), f"{name} declares no CLAIMS"
    cfg = module.get_config(None)
    groups = _groups(module.get_sweep(cfg))
    declared = claims.study_claims(module, cfg, groups)  # a claim naming no planned run raises
    assert all(isinstance(c, (Claim, Trend)) for c in declared)
    assert all(n in groups for c in declared for n in _names(c))
    if not declared:  # a measurement: the file says why it declares none
        text = (EXPERIMENTS / f"{name}.py").read_text()
        assert re.search(r"#[^\n]*\n(#[^\n]*\n)*CLAIMS = \[\]", text), f"{name}: say why"


def _tested(spec: str):
    """(study file, claims, rows, declaration) of a shipped sweep, or None when its rows lack a
    group its claims name (a sweep run with other knobs, e.g. isoflop_1e12's single budget)."""
    path, declared, rows, rec = verdicts.tested(spec)
    have = set(claims._groups(rows))
    return None if any(n not in have for c in declared for n in _names(c)) else (
        path, declared, rows, rec)  # fmt: skip


@pytest.mark.parametrize("spec", SHIPPED + [CONVERT])
def test_shipped_verdicts_use_only_the_declared_words(spec):
    got = _tested(spec)
    if got is None:
        pytest.skip(f"{spec}: ran with knobs that drop a declared group")
    path, declared, rows, rec = got
    text = verdicts.verdict_text(path, declared, rows, rec)
    assert "agree" not in text and "inside the spread" not in text, text
    lines = claims.verdicts(rows, declared)
    assert len(lines) == len(declared)
    for c, line in zip(declared, lines, strict=True):
        m = LINE.match(line)
        assert m and m[1] == c.label, line
        if m[2] != "no verdict":  # every tested verdict carries what a reviewer needs
            assert all(k in line for k in ("95 % CI", "Holm p = ", "MDE ")), line
    if declared:  # every shipped sweep ran before its claims were written down
        assert "post hoc" in text


def test_every_study_with_claims_has_its_verdicts_in_the_readme():
    """The README's verdict table names every study that declares a claim, each by a shipped
    sweep its claims can be tested on."""
    readme = (Path(ROOT) / "README.md").read_text()
    spec = re.search(r"<!-- table: verdict_summary ([^\n]*) -->", readme)
    assert spec, "README.md has no verdict_summary block"
    covered = set()
    for s in spec[1].split():
        got = _tested(s)
        assert got is not None, f"README's verdict_summary {s}: a claim names no run there"
        covered.add(Path(got[0]).stem)
    declaring = {n for n in STUDIES
                 if claims.study_claims(verdicts.study_module(f"experiments/{n}.py"))}  # fmt: skip
    assert declaring <= covered, f"not in the README: {sorted(declaring - covered)}"
    assert "convert_vs_pruned" in covered


def test_convert_vs_pruned_states_that_its_replicates_are_not_independent():
    module = verdicts.study_module("experiments/convert_vs_pruned.py")
    assert module.CLAIMS and all("not independent" in c.source for c in module.CLAIMS)
    text = verdicts.convert_verdicts("convert_vs_pruned_small.json",
                                     "convert_vs_pruned_small_s1.json")  # fmt: skip
    assert text.count("not independent") == len(module.CLAIMS)
    files = ("convert_vs_pruned_small.json", "convert_vs_pruned_small_s1.json")
    flags = [json.loads((EXPERIMENTS / "results" / f).read_text())["flags"] for f in files]
    seeds = {f.get("seed", 0) for f in flags}
    assert seeds == {0, 1} and "2 shared seeds" in text
