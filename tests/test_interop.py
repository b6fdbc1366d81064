"""Hugging Face models in and out, exact against the reference code's own output.

The fixtures under tests/fixtures/hf/ were written by the reference code with random weights:
the official MoLE modeling files (mole-*) and transformers' LlamaForCausalLM (llama: grouped-
query attention, llama3 RoPE scaling, tied head, SwiGLU) and MixtralForCausalLM (mixtral: top-2
of 4 SwiGLU experts, GQA), by `make_fixtures.py` where torch is
installed (each `versions.json` names the versions): their checkpoint, tokenizer and
`reference.npz` (logits of a fixed batch, a greedy continuation and, for MoLE, the table of the
official `reparameterize.py`). No torch here.
"""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_bounded, tiny_overrides
from flax import nnx
from safetensors.numpy import load_file

from configs import dense, moe, mole
from mole_jax.errors import ConfigError, UserError
from mole_jax.infer.engine import build_engine
from mole_jax.infer.export import export_lut
from mole_jax.infer.generate import generate
from mole_jax.interop.hf_export import export_hf
from mole_jax.interop.hf_import import import_hf
from mole_jax.model.config import model_config
from mole_jax.stores.lut import LutStore
from mole_jax.train.checkpoint import restore_model
from mole_jax.workdir import Workdir

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
ROOT = Path(__file__).resolve().parents[1]
KINDS = {"mole-dense": dense, "mole-moe": moe, "mole-mole": mole, "llama": dense, "mixtral": moe}


def config(name, corpus_dir, cache_dir):
    return tiny_overrides(KINDS[name].get_config("size=tiny"), corpus_dir, cache_dir)


@pytest.fixture(scope="module")
def imported(tmp_path_factory, corpus_dir, cache_dir):
    out = {}
    for name in KINDS:
        w = str(tmp_path_factory.mktemp(name) / "w")
        import_hf(FIXTURES / name, w, config(name, corpus_dir, cache_dir))
        out[name] = w
    return out


def params_of(w):
    return jax.device_get(restore_model(w, model_config(Workdir(w).config)).params)


@pytest.mark.parametrize("name", list(KINDS))
def test_imported_logits_and_greedy_tokens_equal_the_reference(imported, name):
    ref = np.load(FIXTURES / name / "reference.npz")
    w = imported[name]
    r = restore_model(w, model_config(Workdir(w).config))
    logits = nnx.merge(r.graphdef, r.params, r.rest)(jnp.asarray(ref["ids"], jnp.int32))
    assert np.abs(np.asarray(logits.logits_BxLxV) - ref["logits"]).max() <= 1e-5
    tokens = generate(build_engine(w, "experts"), ref["prompt"], max_new=len(ref["greedy"]))
    np.testing.assert_array_equal(tokens["tokens"][0], ref["greedy"])


def test_mole_lut_equals_the_official_reparameterized_table(imported):
    """export's float32 LUT, row for row, against reparameterize.py's [V, layers*E*D] table."""
    w = imported["mole-mole"]
    manifest = export_lut(w, dtype="float32")
    ref = np.load(FIXTURES / "mole-mole" / "reference.npz")["table"]
    v, layers, e = ref.shape[0], len(manifest["layers"]), manifest["experts"]
    ref = ref.reshape(v, layers, e, -1)
    rows = LutStore.open(Path(w, "lut")).read_rows(np.arange(v, dtype=np.int32))
    for i, layer in enumerate(manifest["layers"]):
        assert np.abs(rows[layer]["values"] - ref[:, i]).max() <= 1e-5


@pytest.mark.parametrize("name", list(KINDS))
def test_hf_export_gives_the_reference_checkpoint_back_and_imports_bit_for_bit(
    imported, name, tmp_path, corpus_dir, cache_dir
):
    out = tmp_path / "hf"
    export_hf(imported[name], out)
    ref, got = (
        load_file(FIXTURES / name / "model.safetensors"),
        load_file(out / "model.safetensors"),
    )
    assert sorted(got) == sorted(ref)
    for key, value in ref.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    cfg_ref = json.loads((FIXTURES / name / "config.json").read_text())
    cfg_out = json.loads((out / "config.json").read_text())
    # every field the reference's config.json has, but its bookkeeping (and, for the official
    # family, hidden_act: its code hard-codes GELU whatever the field says)
    ignored = {
        "transformers_version",
        "torch_dtype",
        "initializer_range",
        "bos_token_id",
        "eos_token_id",
        "use_cache",
        "attention_dropout",
        "output_router_logits",
        "router_aux_loss_coef",
        "router_jitter_noise",
        "head_dim",
    }
    ignored |= {"hidden_act"} if name.startswith("mole-") else set()
    for key in sorted(set(cfg_ref) - ignored):
        assert cfg_out.get(key) == cfg_ref[key], key
    again = str(tmp_path / "again")
    import_hf(out, again, config(name, corpus_dir, cache_dir))
    a, b = params_of(imported[name]), params_of(again)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_export_refuses_a_model_the_reference_code_would_compute_differently(
    tmp_path, corpus_dir, cache_dir
):
    """modeling_moe.py hard-codes top-10: a top-2 MoE is refused, not exported as another
    model; so are capacity dispatch and expert-choice routing."""
    src = _copy("mole-moe", tmp_path, edit={"num_experts_per_tok": 2})
    w = str(tmp_path / "w")
    import_hf(src, w, config("mole-moe", corpus_dir, cache_dir))
    assert model_config(Workdir(w).config).ffn.topk == 2
    with pytest.raises(UserError, match="hard-codes top-10"):
        export_hf(w, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_refuses_a_damaged_tokenizer_before_writing(imported, tmp_path):
    """The tokenizer handed on is the one checksums.json recorded, never a changed file."""
    w = tmp_path / "w"
    shutil.copytree(imported["llama"], w)
    tok = w / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"model"', '"model" ', 1))
    with pytest.raises(ConfigError, match="tokenizer.json fails its checksum"):
        export_hf(str(w), tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))


def test_a_changed_tokenizer_is_refused_after_the_first_checkpoint(
    imported, tmp_path, corpus_dir, cache_dir
):
    """Training an imported model with another tokenizer (as a config that retrains the BPE
    would give): refused in one line before anything is written, not trained on new ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from mole_jax.errors import ConfigError
    from mole_jax.train import loop

    w = str(tmp_path / "w")
    shutil.copytree(imported["llama"], w)
    cfg = Workdir(w).editable_config()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["another text entirely, another vocabulary"] * 4,
        trainers.BpeTrainer(vocab_size=100, special_tokens=["<|endoftext|>", "<unk>"]),
    )
    tok.save(str(tmp_path / "other.json"))
    cfg.data.tokenizer = str(tmp_path / "other.json")
    before = Path(w, "tokenizer.json").read_bytes()
    with pytest.raises(ConfigError, match="a run keeps its tokenizer"):
        loop.run(cfg, w)
    assert Path(w, "tokenizer.json").read_bytes() == before


def test_sharded_checkpoint_imports_equal_to_the_single_file(
    imported, tmp_path, corpus_dir, cache_dir
):
    """export with a small shard size writes model-0000N-of-0000M + the index, as
    save_pretrained does for large models; importing it gives the same parameters."""
    out = tmp_path / "sharded"
    files = export_hf(imported["mole-mole"], out, shard_bytes=64 * 2**10)["files"]
    assert "model.safetensors.index.json" in files and len(files) > 4
    w = str(tmp_path / "w")
    import_hf(out, w, config("mole-mole", corpus_dir, cache_dir))
    jax.tree.map(np.testing.assert_array_equal, params_of(imported["mole-mole"]), params_of(w))


def _as_pytorch_bin(name, tmp_path, shards: int) -> Path:
    """Fixture `name` with its weights as PyTorch .bin files (`shards` > 1: with the index)."""
    import torch

    d = tmp_path / f"bin{shards}"
    shutil.copytree(FIXTURES / name, d)
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    files = {}
    for i in range(shards):
        file = (
            "pytorch_model.bin" if shards == 1 else f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        )
        part = {k: torch.from_numpy(tensors[k].copy()) for k in names[i::shards]}
        torch.save(part, d / file)
        files.update(dict.fromkeys(part, file))
    if shards > 1:
        (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": files}))
    return d


def test_pytorch_bin_weights_import_equal_to_safetensors(imported, tmp_path, corpus_dir, cache_dir):
    """Read through torch when it is installed (one file, and shards with their index)."""
    pytest.importorskip("torch")
    for shards in (1, 3):
        w = str(tmp_path / f"w{shards}")
        import_hf(
            _as_pytorch_bin("llama", tmp_path, shards), w, config("llama", corpus_dir, cache_dir)
        )
        jax.tree.map(np.testing.assert_array_equal, params_of(imported["llama"]), params_of(w))


def test_pytorch_bin_weights_without_torch_are_refused_saying_how_to_convert(
    tmp_path, corpus_dir, cache_dir
):
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed: .bin weights are read (the test above)")
    src = _copy("llama", tmp_path)
    (src / "model.safetensors").rename(src / "pytorch_model.bin")  # never opened without torch
    w = tmp_path / "w"
    with pytest.raises(UserError, match=r"read with torch \(not installed here\).*save_pretrained"):
        import_hf(src, w, config("llama", corpus_dir, cache_dir))
    assert not w.exists()


def _copy(name, tmp_path, edit=None, drop=None):
    """A copy of fixture `name` with config.json fields changed and tensors dropped."""
    d = tmp_path / "src"
    shutil.copytree(FIXTURES / name, d)
    if edit:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(edit)
        (d / "config.json").write_text(json.dumps(cfg))
    if drop:
        from safetensors.numpy import save_file

        tensors = load_file(d / "model.safetensors")
        for key in drop:
            tensors.pop(key)
        save_file(tensors, d / "model.safetensors")
    return d


BAD = [
    ("mole-mole", dict(edit={"architectures": ["GPT2LMHeadModel"]}), "not supported (supported"),
    ("mole-mole", dict(edit={"attention_bias": True}), "attention_bias=True"),
    ("mole-mole", dict(edit={"rope_scaling": {"type": "linear", "factor": 2.0}}), "rope_scaling"),
    ("mole-mole", dict(edit={"num_key_value_heads": 2}), "num_key_value_heads=2"),
    ("mole-mole", dict(edit={"num_experts": 5}), "experts.4.down_proj.weight"),  # mismatched
    ("mole-mole", dict(drop=["model.layers.1.router.weight"]), "lacks 1 tensor(s): model.layer"),
    ("mole-mole", dict(edit={"hidden_size": 48}), "has shape"),
    ("llama", dict(edit={"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}), "'llama3'"),
    ("llama", dict(edit={"sliding_window": 4096}), "sliding_window=4096"),
    ("llama", dict(edit={"hidden_act": "gelu_new"}), "hidden_act='gelu_new'"),
    ("llama", dict(edit={"tie_word_embeddings": False}), "lacks 1 tensor(s): lm_head.weight"),
    # GQA k/v of half width with num_key_value_heads left out: refused, never half-filled
    ("llama", dict(edit={"num_key_value_heads": None}), "self_attn.k_proj.weight has shape"),
    ("llama", dict(edit={"rope_scaling": "llama3"}), "rope_scaling=llama3"),
]


@pytest.mark.parametrize("name,change,message", BAD)
def test_bad_checkpoints_are_refused_in_one_line_and_write_nothing(
    tmp_path, corpus_dir, cache_dir, name, change, message
):
    src, w = _copy(name, tmp_path, **change), tmp_path / "w"
    with pytest.raises(UserError, match=re.escape(message)):
        import_hf(src, w, config(name, corpus_dir, cache_dir))
    assert not w.exists()


def test_missing_tokenizer_and_a_workdir_of_another_run_are_refused(
    imported, tmp_path, corpus_dir, cache_dir
):
    src = _copy("mole-mole", tmp_path)
    (src / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="pass --tokenizer"):
        import_hf(src, tmp_path / "w", config("mole-mole", corpus_dir, cache_dir))
    with pytest.raises(UserError, match="already holds another run"):
        import_hf(
            FIXTURES / "mole-dense",
            imported["mole-mole"],
            config("mole-dense", corpus_dir, cache_dir),
        )
    before = params_of(imported["mole-mole"])
    again = import_hf(
        FIXTURES / "mole-mole", imported["mole-mole"], config("mole-mole", corpus_dir, cache_dir)
    )
    assert again["architecture"] == "MoleForCausalLM"  # the same import: nothing to do
    jax.tree.map(np.testing.assert_array_equal, before, params_of(imported["mole-mole"]))
    # other weights of the same shape (and so the same file sizes) are another run
    from safetensors.numpy import save_file

    other = tmp_path / "other"
    shutil.copytree(FIXTURES / "mole-mole", other)
    tensors = load_file(other / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1
    save_file(tensors, other / "model.safetensors", {"format": "pt"})
    with pytest.raises(UserError, match="already holds another run"):
        import_hf(other, imported["mole-mole"], config("mole-mole", corpus_dir, cache_dir))


@pytest.mark.slow
def test_import_export_and_offloaded_eval_from_the_command_line(tmp_path, corpus_dir, cache_dir):
    """launch.py import -> export (LUT) -> eval and lm-eval tasks in memory and offloaded
    (equal) -> export --format=hf; a bad directory, or hf: without --allow_hub, is one `error:`
    line, exit 2."""
    w, hf = str(tmp_path / "w"), str(tmp_path / "hf")
    data = [
        f"--config.data.corpus=files:{corpus_dir}/*.txt",
        f"--config.data.cache_dir={cache_dir}",
        "--config.data.seq_len=32",
        "--config.data.val_fraction=0.2",
    ]

    def launch(*args):  # a hung run fails the test with its stacks (conftest.run_bounded)
        return run_bounded([sys.executable, str(ROOT / "launch.py"), *args], timeout=240)

    out = launch(
        "import",
        f"--from={FIXTURES / 'mole-mole'}",
        f"--workdir={w}",
        "--config=configs/mole.py:size=tiny",
        *data,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "imported MoleForCausalLM" in out.stdout
    assert launch("export", f"--workdir={w}", "--dtype=float32").returncode == 0
    losses = []
    for extra in ([], ["--offload"]):
        run = launch("eval", f"--workdir={w}", *extra, f"--json={tmp_path}/e{len(losses)}.json")
        assert run.returncode == 0, run.stderr[-2000:]
        losses.append(json.loads(Path(tmp_path, f"e{len(losses)}.json").read_text())["loss"])
    assert abs(losses[0] - losses[1]) <= 1e-5
    scores = []
    for extra in ([], ["--offload"]):  # lm-eval's scoring, in memory and from the LUT
        run = launch("eval", f"--workdir={w}", "--tasks=mole_offline", "--limit=4", *extra)
        assert run.returncode == 0, run.stderr[-2000:]
        name = "tasks_offload.json" if extra else "tasks.json"
        scores.append(json.loads(Path(w, "eval", name).read_text())["tasks"])
    for task, row in scores[0].items():
        for metric, value in row.items():
            assert abs(scores[1][task][metric] - value) <= 1e-5, (task, metric)
    out = launch("export", f"--workdir={w}", "--format=hf", f"--to={hf}")
    assert out.returncode == 0 and Path(hf, "model.safetensors").is_file(), out.stderr[-2000:]
    bad = launch("import", f"--from={tmp_path}", f"--workdir={tmp_path}/x")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr
    assert bad.stderr.startswith("error: ") and "config.json" in bad.stderr
    hub = launch("import", "--from=hf:JieShibo/MoLE-160M-4E", f"--workdir={tmp_path}/y")
    assert hub.returncode == 2 and "add --allow_hub" in hub.stderr, hub.stderr
    assert not Path(tmp_path, "y").exists()


def test_mixtral_experts_offloaded_with_lru_and_prefetch_generate_as_in_memory(imported):
    """The offloading paper's pipeline on imported weights: Mixtral -> expert store -> greedy
    decoding with an LRU cache of 2 experts per layer and speculative prefetch: the reference's
    tokens from a float16 store; from an int2 store (the fixture's d_model of 32 takes int2's
    groups of 16), the logits of the in-memory model whose experts are dequantised."""
    from mole_jax.infer.export import export_experts
    from mole_jax.stores import quant

    w = imported["mixtral"]
    ref = np.load(FIXTURES / "mixtral" / "reference.npz")
    export_experts(w, dtype="float16", out="experts_fp16")
    eng = build_engine(w, "moe_offload", store="experts_fp16", capacity=2, prefetch=True)
    got = generate(eng, ref["prompt"], max_new=len(ref["greedy"]))["tokens"][0]
    np.testing.assert_array_equal(got, ref["greedy"])
    assert eng.stats()["experts_read"] > 0
    m = export_experts(w, dtype="int2", out="experts_int2")
    mem = build_engine(w, "experts")
    for i in m["layers"]:
        ffn = mem.params["blocks"][i]["ffn"]
        for name in ("up", "down"):
            ffn[name] = quant.group_dequantize(
                quant.group_quantize(np.asarray(ffn[name]), "int2"), "int2"
            )
    eng = build_engine(w, "moe_offload", store="experts_int2", capacity=2, prefetch=True)
    want, _ = mem.forward(ref["ids"])
    got, _ = eng.forward(ref["ids"])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_train_fine_tunes_an_imported_model_from_its_step_0(tmp_path, corpus_dir, cache_dir):
    """The import's checkpoint holds no optimiser state (its memory is the model's own bytes):
    train makes a fresh one at step 0, then trains and checkpoints as usual."""
    from mole_jax.train import loop
    from mole_jax.train.metrics import read_metrics

    w = str(tmp_path / "w")
    cfg = config("llama", corpus_dir, cache_dir)
    import_hf(FIXTURES / "llama", w, cfg)
    out = loop.run(Workdir(w).editable_config(), w)
    losses = [r["loss"] for r in read_metrics(w) if "loss" in r]
    assert out["step"] == 20 and len(losses) == 20 and losses[-1] < losses[0]


@pytest.mark.slow
def test_read_me_converts_an_imported_llama_into_a_pre_gated_moe_with_swiglu_experts(
    imported, tmp_path, corpus_dir, cache_dir
):
    """Read-ME's pipeline on imported weights: Llama (gated, GQA, tied) -> convert -> a
    pre-gated MoE whose experts are SwiGLU slices of the dense FFN -> eval, and queue serving
    equal to the in-memory model."""
    from configs import pregated
    from mole_jax.eval.validation import evaluate
    from mole_jax.train.convert import convert

    cfg = pregated.get_config("size=tiny,convert=1,experts=2,permanent=1")
    cfg.unlock()
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "activation"):
        cfg.model[name] = Workdir(imported["llama"]).config.model[name]
    c = cfg.model.ffn.pregated
    c.update(dict(permanent=16, d_expert=24, router_d=32, router_heads=4))
    domains = [f"files:{corpus_dir}/doc0[0-5].txt", f"files:{corpus_dir}/doc0[6-9].txt"]
    cfg.convert.update(
        dict(domains=",".join(domains), rounds=1, router_steps=4, expert_steps=2, calib_windows=2)
    )
    cfg.train.batch_size = 8
    w = str(tmp_path / "pg")
    rec = convert(imported["llama"], w, cfg)
    assert rec["permanent_channels"] == 16 and rec["expert_channels"] == 24
    m = model_config(Workdir(w).config)
    assert m.gated and m.kind == "pregated" and m.n_kv_heads == 2 and m.tie_embeddings
    assert np.isfinite(evaluate(w, n_batches=1)["loss"])
    from mole_jax.infer.export import export_experts
    from mole_jax.infer.offload.server import serve

    export_experts(w, dtype="float32")
    ref = build_engine(w, "experts")
    prompts = [np.array([5, 9, 11, 3]), np.array([7, 2]), np.array([40, 41, 42])]
    news = [4, 3, 5]
    want = [
        generate(ref, p[None], n)["tokens"][0].tolist() for p, n in zip(prompts, news, strict=True)
    ]
    eng = build_engine(w, "lookahead", capacity=2)
    out = serve(eng, prompts, news, budget=8, policy="expert_aware", eviction="lru")
    assert [out["tokens"][i] for i in range(3)] == want


def test_released_study_plans_the_eight_checkpoints_without_the_network():
    out = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "released.py"), "--dry_run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith(("Dense", "MoE", "MoLE"))]
    assert len(rows) == 8 and "lambada_openai" in out.stdout
