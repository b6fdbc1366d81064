"""Config building, validation errors and parameter accounting for every shipped size."""

import pytest

from configs import dense, moe, mole, peer
from mole_jax.config import SIZES, parse_arg
from mole_jax.errors import ConfigError
from mole_jax.model.ffn import layer_indices
from mole_jax.train import accounting
from mole_jax.train.validate import validate

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


# Table 2 of the MoLE paper: params in training (billions).
PAPER_TABLE_2 = [
    (moe, "size=160m,experts=10", 0.39),
    (mole, "size=160m,experts=4", 0.39),
    (moe, "size=160m,experts=34", 1.07),
    (mole, "size=160m,experts=16", 1.07),
    (moe, "size=410m,experts=10", 1.21),
    (mole, "size=410m,experts=4", 1.21),
    (moe, "size=410m,experts=34", 3.63),
    (mole, "size=410m,experts=16", 3.63),
    (moe, "size=1b,experts=10", 3.16),
    (mole, "size=1b,experts=4", 3.16),
]


@pytest.mark.parametrize("module,arg,billions", PAPER_TABLE_2)
def test_paper_configs_match_table_2(module, arg, billions):
    cfg = module.get_config(arg)
    validate(cfg, n_devices=1)
    s = accounting.summarize(cfg)
    assert s["params_total"] == s["params_total_formula"]
    assert abs(s["params_total"] / (billions * 1e9) - 1) < 0.02, s["params_total"]


def test_mole_and_moe_accounting_follow_table_1():
    d, v, n = 768, 50304, 12
    s = accounting.summarize(mole.get_config("size=160m,experts=4"))
    assert s["lut_values"] == n * v * 4 * d == 1_854_406_656  # "1.85 B LUT values offloaded"
    assert s["lut_values_per_token"] == n * 4 * d == 36_864
    assert s["lut_bytes_per_token"]["float16"] == 73_728  # "72 KB per token"
    dense_s = accounting.summarize(dense.get_config("size=160m"))
    # LUT form: resident = dense + router; FLOPs = dense + router + combining E rows
    assert s["params_resident"] == dense_s["params_total"] + n * d * 4
    assert s["flops_per_token"] == dense_s["flops_per_token"] + n * (2 * d * 4 + 2 * 4 * d)
    m = accounting.summarize(moe.get_config("size=160m,experts=10"))
    # top-2 of experts of width F/2 activates as many FFN params as dense (+ router)
    assert m["params_active_per_token"] == dense_s["params_total"] + n * d * 10
    p = accounting.summarize(peer.get_config("size=160m"))
    assert p["layer_kinds"] == ["dense"] * 6 + ["peer"] + ["dense"] * 5


def test_kind_specific_validation():
    cases = [
        (moe, "size=tiny,experts=4,topk=5", "topk=5 must be between 1 and"),
        (moe, "size=tiny,experts=0", "experts=0 must be >= 1"),
        (peer, "size=tiny,keys=8,topk=16", "topk=16 must be between 1 and"),
        (mole, "size=tiny,input=tokens", "expert_input='tokens': use one of embedding|hidden"),
    ]
    for module, arg, match in cases:
        with pytest.raises(ConfigError, match=match):
            validate(module.get_config(arg), n_devices=1)


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
