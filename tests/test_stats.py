"""The studies' statistics (mole_jax/sweeps/stats.py, claims.py) against cases computed by hand:
a paired t test, Holm's correction, a bootstrap interval, the minimum detectable effect, and the
verdict words (a null result is never agreement)."""

import json

import numpy as np
import pytest

from mole_jax.errors import ConfigError
from mole_jax.sweeps import claims, stats
from mole_jax.sweeps.stats import Claim, Trend


def test_paired_t_by_hand():
    # differences 1, 2, 3: mean 2, sd 1, se 1/sqrt(3); t = 3.4641 on 2 df
    r = stats.paired([3.0, 5.0, 7.0], [2.0, 3.0, 4.0])
    se = 1 / np.sqrt(3)
    assert r.effect == pytest.approx(2.0)
    assert r.p == pytest.approx(0.07418, abs=1e-5)
    t975 = 4.302653  # t_{0.975, 2}
    assert (r.lo, r.hi) == pytest.approx((2 - t975 * se, 2 + t975 * se), abs=1e-5)
    # MDE at 80 % power: (t_{0.975,2} + t_{0.80,2}) * se, t_{0.80,2} = 1.060660
    assert r.mde == pytest.approx((t975 + 1.060660) * se, abs=1e-5)
    # the p of a t with 2 df has a closed form: 1 - t / sqrt(t^2 + 2)
    t = 2 / se
    assert r.p == pytest.approx(1 - t / np.sqrt(t * t + 2), abs=1e-12)


def test_welch_is_the_unpaired_test():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0])
    r = stats.welch(a, b)
    # variances 1 and 4, se = sqrt(1/3 + 4/3); Welch df = (5/3)^2 / ((1/3)^2/2 + (4/3)^2/2)
    se, df = np.sqrt(5 / 3), (5 / 3) ** 2 / ((1 / 9) / 2 + (16 / 9) / 2)
    assert r.effect == pytest.approx(-2.0)
    assert r.hi - r.effect == pytest.approx(se * float(stats.stats.t.ppf(0.975, df)))


def test_holm_by_hand():
    # sorted 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> kept monotone at 0.06)
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    got = stats.holm([float("nan"), 0.02])
    assert np.isnan(got[0]) and got[1] == pytest.approx(0.02)  # NaN is not counted


def test_mde_shrinks_with_the_design_and_grows_with_the_tests():
    assert stats.mde(1.0, 10**6) == pytest.approx(1.959964 + 0.841621, abs=1e-4)  # normal limit
    assert stats.mde(1.0, 10**6, m=2) == pytest.approx(2.241403 + 0.841621, abs=1e-4)  # alpha/2


def test_bootstrap_interval_by_enumeration():
    # one seed, two items: a wins item 1 only; resampled differences 0, 1/2, 1 with chances
    # 1/4, 1/2, 1/4, so the 95 % percentile interval is [0, 1] and d <= 0 a quarter of the time
    r = stats.bootstrap_items(np.array([[0.0, 1.0]]), np.array([[0.0, 0.0]]), n_boot=20000)
    assert r.effect == pytest.approx(0.5)
    assert (r.lo, r.hi) == (0.0, 1.0)
    assert r.p == pytest.approx(0.5, abs=0.02)  # 2 * P(d <= 0) = 2 * 1/4
    # identical scores: every resample is 0
    same = stats.bootstrap_items(np.ones((2, 5)), np.ones((2, 5)))
    assert (same.effect, same.lo, same.hi, same.mde) == (0.0, 0.0, 0.0, 0.0)


def _rows(groups: dict[str, list[float]], metric="val_loss"):
    return [
        {"name": f"{g}-s{i}", "group": g, "set": {"seed": i}, metric: v}
        for g, vs in groups.items()
        for i, v in enumerate(vs)
    ]


def test_verdict_words():
    rows = _rows({"a": [1.0, 2.0, 3.0], "b": [1.5, 2.6, 3.4], "c": [1.0, 2.1, 2.9]})
    lines = claims.verdicts(rows, [Claim("a", "b"), Claim("b", "a"), Claim("a", "c")])
    assert lines[0].startswith("a better than b (val_loss): reproduced")  # paired: b - a > 0
    assert lines[1].startswith("b better than a (val_loss): contradicted")
    assert lines[2].startswith("a better than c (val_loss): not resolved at this scale")
    assert all("paired t over seeds, 3 shared seeds" in s and "MDE" in s for s in lines)
    # the same numbers unpaired (different seeds) are not resolved: Welch sees the seed spread
    rows[3:6] = [dict(r, set={"seed": 10 + i}) for i, r in enumerate(rows[3:6])]
    assert "not resolved" in claims.verdicts(rows, [Claim("a", "b")])[0]
    assert not any("agree" in s or "inside the spread" in s for s in lines)


def test_trend_is_per_seed_and_accuracies_add_item_error():
    rows = _rows({"e2": [3.0, 3.1, 2.9], "e4": [2.8, 2.95, 2.75], "e8": [2.7, 2.8, 2.6]})
    (line,) = claims.verdicts(rows, [Trend((("e2", 2), ("e4", 4), ("e8", 8)), "E")])
    assert "reproduced" in line and "paired slopes over seeds, 3 seeds × 3 points" in line
    acc = [
        {"name": f"{g}-s{i}", "group": g, "set": {"seed": i},
         "tasks": {"model": {"tasks": {"t": {"acc": v, "acc_stderr": 0.02}}}}}
        for g, vs in {"x": [0.31, 0.32, 0.30], "y": [0.30, 0.31, 0.29]}.items()
        for i, v in enumerate(vs)
    ]  # fmt: skip
    (line,) = claims.verdicts(acc, [Claim("x", "y", "task:model/t/acc")])
    # +0.01 in every seed (significant over seeds alone) is within the items' error of 0.02
    assert "not resolved" in line and "item error, unpaired bound" in line


def test_claims_must_name_the_sweeps_groups():
    class Study:
        CLAIMS = [Claim("a", "nope")]

    with pytest.raises(ConfigError, match="no run or seed group named nope"):
        claims.study_claims(Study, {}, {"a", "b"})


def test_claims_are_declared_before_runs_and_a_change_is_marked(tmp_path):
    first = claims.declare(str(tmp_path), [Claim("a", "b")], finished=0)
    assert first["declared_after_runs"] == 0
    assert claims.declare(str(tmp_path), [Claim("a", "b")], finished=5) == first  # unchanged
    later = claims.declare(str(tmp_path), [Claim("b", "a")], finished=5)
    assert later["declared_after_runs"] == 5
    assert json.loads((tmp_path / "claims.json").read_text()) == later
    text = claims.section(_rows({"a": [1, 2, 3], "b": [2, 3, 4.5]}), [Claim("b", "a")], later, "x")
    assert "post hoc" in text and text.endswith("Exploratory (not declared before the runs):\nx")


def test_accuracies_with_saved_items_are_paired_item_by_item():
    rng = np.random.default_rng(0)
    base = rng.random(400) < 0.5  # the same 400 documents for both models
    flip = rng.random(400) < 0.15
    rows = []
    for g, wins in (("x", base | flip), ("y", base)):  # x right on 15 % more of the items
        for i in range(2):
            items = wins.astype(float).tolist()
            task = {"acc": float(np.mean(items)), "acc_stderr": 0.025}
            scored = {"model": {"tasks": {"t": task}, "items": {"t": items}}}
            rows.append({"name": f"{g}-s{i}", "group": g, "set": {"seed": i}, "tasks": scored})
    (line,) = claims.verdicts(rows, [Claim("x", "y", "task:model/t/acc")])
    # about +0.07 (half the flipped items were already right): x never loses an item to y, so
    # the paired resamples never reach 0
    assert "reproduced" in line and "paired bootstrap over items, 2 vs 2 seeds × 400 items" in line
