"""Config building, validation errors and parameter accounting for every shipped size."""

import pytest

from configs import dense
from mole_jax import accounting
from mole_jax.config import SIZES, layer_indices, parse_arg, validate
from mole_jax.errors import ConfigError

# Paper Table 2 "params in training" for dense (V = 50,304).
PAPER_DENSE = {"160m": 0.16e9, "410m": 0.41e9, "1b": 1.01e9}


@pytest.mark.parametrize("size", list(SIZES))
def test_every_size_builds_validates_and_counts(size):
    cfg = dense.get_config(f"size={size}")
    validate(cfg, n_devices=1)
    s = accounting.summarize(cfg)
    # The closed-form count must equal the count of the abstractly built model, exactly.
    assert s["params_total"] == s["params_total_formula"]
    assert s["params_active_per_token"] == s["params_total"]  # dense: every parameter is used
    if size in PAPER_DENSE:
        assert abs(s["params_total"] / PAPER_DENSE[size] - 1) < 0.02, s["params_total"]


def test_160m_dense_matches_pythia_shape():
    s = accounting.summarize(dense.get_config("size=160m"))
    d, f, v, n = 768, 3072, 50304, 12
    expected = 2 * v * d + d + n * (4 * d * d + 2 * d * f + 2 * d)
    assert s["params_total"] == expected
    # forward FLOPs: 2 per weight multiply-add + attention scores over the 2048 context
    assert s["flops_per_token"] == n * (2 * (4 * d * d + 2 * d * f) + 4 * 2048 * d) + 2 * v * d


def _expect_error(match, **fields):
    cfg = dense.get_config("size=tiny")
    for path, value in fields.items():
        node = cfg
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    with pytest.raises(ConfigError, match=match):
        validate(cfg, n_devices=8)


@pytest.mark.parametrize(
    "match,fields",
    [
        ("n_heads=5 must divide", {"model__n_heads": 5}),
        ("model.d_model=0 must be a positive", {"model__d_model": 0}),
        ("model.n_layers=-1 must be a positive", {"model__n_layers": -1}),
        ("train.steps=0 must be a positive", {"train__steps": 0}),
        ("kind='sparse' is not one of", {"model__ffn__kind": "sparse"}),
        ("divisible by the 8 devices", {"train__batch_size": 12}),
        ("divisible by train.microbatches=3", {"train__microbatches": 3}),
        ("exceeds model.max_seq_len", {"data__seq_len": 4096}),
        ("model.dtype='float16'", {"model__dtype": "float16"}),
        ("head dim", {"model__n_heads": 64, "model__d_model": 64}),
        ("train.lr=0", {"train__lr": 0.0}),
        ("names blocks \\[7\\]", {"model__ffn__layers": "0,7"}),
        ("exceeds model.vocab_size", {"data__vocab_size": 9000}),
    ],
)
def test_validate_names_the_bad_field(match, fields):
    _expect_error(match, **fields)


def test_parse_arg_rejects_unknown_and_badly_typed():
    assert parse_arg("size=small", dict(size="tiny", experts=4)).size == "small"
    assert parse_arg("experts=16", dict(size="tiny", experts=4)).experts == 16
    with pytest.raises(ConfigError, match="unknown config argument 'expert'"):
        parse_arg("expert=4", dict(size="tiny", experts=4))
    with pytest.raises(ConfigError, match="experts='four' is not a int"):
        parse_arg("experts=four", dict(size="tiny", experts=4))
    with pytest.raises(ConfigError, match="size='huge' is not one of"):
        parse_arg("size=huge", dict(size="tiny"))


def test_layer_placement_specs():
    assert layer_indices("all", 4) == (0, 1, 2, 3)
    assert layer_indices("middle", 12) == (6,)
    assert layer_indices("every_2", 6) == (1, 3, 5)
    assert layer_indices("2, 0", 4) == (0, 2)
    assert layer_indices("none", 4) == ()
    with pytest.raises(ConfigError):
        layer_indices("every_x", 4)


def test_unknown_override_field_is_rejected():
    cfg = dense.get_config("size=tiny")
    with pytest.raises(AttributeError):  # locked: a typo cannot add a silent new field
        cfg.train.stepz = 3
