"""A small fixed-seed subset of the fault campaign (experiments/faults.py): a kill, a damaged
checkpoint, a damaged LUT store, a full disk, two writers and bad input lose nothing, print no
traceback and recover."""

import random
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, f"{ROOT}/experiments")
import faults  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return faults.Base(tmp_path_factory.mktemp("faults"))


# The later kinds (diverge, export_damaged, missing_shard, read_only, damage_metrics, ...) each
# have a direct test of the same fault (test_train, test_export, test_reliability,
# test_workdir_damage); the campaign records that they land (experiments/results/faults*.json).
@pytest.mark.parametrize(
    "kind", ["kill_train", "damage_checkpoint", "damage_lut", "disk_full", "two_writers"]
)
def test_a_fault_lands_loses_nothing_and_recovers(base, kind):
    out = faults.KINDS[kind](base, random.Random(f"test-{kind}"), 0)
    assert out["landed"], out  # the fault was injected: a kill before the exit, a limit hit
    assert out["lost"] == 0 and out["tracebacks"] == 0, out
    assert out["recovered"], out


def test_bad_input_is_refused_in_one_line(base):
    cases = faults.invalid_inputs(base)
    for args in cases[::4]:  # a quarter of them; the campaign runs all
        out = faults.check_invalid(base, args)
        assert out["recovered"] and out["tracebacks"] == 0, out
