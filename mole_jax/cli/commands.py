"""The subcommands of launch.py, one function each, taking the parsed absl flags."""

from __future__ import annotations

import json

from mole_jax.errors import UserError
from mole_jax.model.config import model_config


def _need(flag_values, *names: str) -> None:
    for name in names:
        if getattr(flag_values, name) in (None, ""):
            raise UserError(f"--{name} is required for this command")


def train(f):
    from mole_jax.parallel import distributed
    from mole_jax.train import loop as train_lib

    _need(f, "workdir")
    cfg = f.config or _workdir_config(f.workdir)
    distributed.initialize(f.coordinator, f.num_processes, f.process_id)
    out = train_lib.run(cfg, f.workdir)
    if not distributed.is_primary():
        return out
    figures = [
        f"{name} {out[key]:{fmt}}"
        for name, key, fmt in (("loss", "loss", ".4f"), ("val_loss", "val_loss", ".4f"),
                               ("tokens/s", "tokens_per_s", ".0f"))
        if out.get(key) is not None
    ]  # fmt: skip
    print(
        f"trained to step {out['step']}: {', '.join(figures) or 'nothing left to train'}; "
        f"logs in {f.workdir}/metrics.jsonl and {f.workdir}/tb"
    )
    return out


def _check_text(flag: str, text: str) -> None:
    """Command-line text is decoded with surrogate escapes: bytes that are not UTF-8 arrive as
    lone surrogates, which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start].encode("utf-8", "surrogateescape")
        raise UserError(
            f"{flag} is not UTF-8 text (byte 0x{bad.hex()} at character {e.start}); pass "
            "UTF-8, e.g. convert it with iconv"
        ) from None


def _workdir_config(workdir: str):
    """`train --workdir=W` without --config: W's own config (an imported or converted model's,
    or a run to continue as it was)."""
    from mole_jax.workdir import Workdir

    wd = Workdir(workdir)
    if not wd.config_path.exists():
        raise UserError(f"--config is required: {workdir} holds no config.json yet")
    return wd.editable_config()


def convert(f):
    from mole_jax.train.convert import convert as convert_model

    _need(f, "from", "workdir", "config")
    out = convert_model(getattr(f, "from"), f.workdir, f.config)
    losses = [(r["distill"] or {}).get("last") for r in out["rounds"]]
    print(
        f"converted {out['source']} into {f.workdir}: {len(out['domains'])} experts "
        f"({out['expert_channels']} channels each, {out['permanent_channels']} permanent); "
        f"router distillation loss by round {losses}; record in {f.workdir}/convert.json"
    )
    return out


def summary(f):
    from mole_jax.cli.summary import render as render_summary
    from mole_jax.train import accounting
    from mole_jax.train.validate import planned_devices, validate

    _need(f, "config")
    validate(f.config, n_devices=planned_devices(f.config.mesh))
    if f.platform not in (None, "cpu", "gpu", "tpu"):
        raise UserError(f"--platform={f.platform} is not one of cpu, gpu, tpu")
    s = accounting.summarize(f.config, platform=f.platform)
    print(render_summary(f.config, s, f.budget_gib))
    return s


def compile(f):  # noqa: A001 - the subcommand's name
    from mole_jax.cli.summary import render_compile
    from mole_jax.files import write_text_atomic
    from mole_jax.parallel import targets
    from mole_jax.train.aot import compile_step

    _need(f, "config", "topology")
    report = compile_step(f.config, targets.parse(f.topology, f.num_slices))
    print(render_compile(report))
    if not f.json:  # (with --json, main writes the report there)
        write_text_atomic("compile.json", json.dumps(report, indent=2))
        print("report: compile.json")
    return report


def export(f):
    from mole_jax.infer.export import export_lut
    from mole_jax.stores.store import array_bytes

    _need(f, "workdir")
    if f.format == "hf":
        return _export_hf(f)
    if f.experts:
        if f.layout:
            raise UserError("--layout arranges a LUT's rows; an expert store has one layout")
        return _export_experts(f)
    m = export_lut(f.workdir, f.step, f.dtype, out=f.to or "lut", layout=f.layout)
    total = sum(array_bytes(a) for a in m["arrays"].values())
    print(
        f"exported {len(m['layers'])} MoLE layer(s) of step {m['checkpoint_step']} to "
        f"{m['location']} ({m['dtype']}, {m['layout']}): {m['vocab_size']} rows x "
        f"{m['experts']} experts x {m['d_model']}, {total / 2**20:.1f} MiB, "
        f"{m['bytes_per_token']} bytes per token"
    )
    return m


def _export_hf(f):
    from mole_jax.interop.hf_export import export_hf

    _need(f, "to")
    out = export_hf(f.workdir, f.to, f.step)
    print(
        f"exported step {out['step']} of {f.workdir} as {out['architecture']} to {out['to']} "
        f"({', '.join(out['files'])})"
    )
    return out


def import_(f):
    from mole_jax.cli.help import load_config
    from mole_jax.interop.hf_import import import_hf, kind_of

    _need(f, "from", "workdir")
    src = getattr(f, "from")
    if src.startswith("hf:"):
        src = _hub_snapshot(src[3:], f.allow_hub)
    cfg = f.config or load_config(f"configs/{kind_of(src)}.py:size=tiny")
    out = import_hf(src, f.workdir, cfg, f.tokenizer)
    print(
        f"imported {out['architecture']} ({out['tensors']} tensors) from {src} into "
        f"{f.workdir} as a '{out['kind']}' model at step 0"
    )
    for note in out["notes"]:
        print(f"note: {note}")
    return out


def _hub_snapshot(repo_id: str, allowed: bool) -> str:
    """A Hugging Face hub model's files (config, safetensors, tokenizer) in the local hub cache;
    only with --allow_hub (offline is the default)."""
    if not allowed:
        raise UserError(
            f"--from=hf:{repo_id} downloads from the Hugging Face hub: add "
            "--allow_hub, or pass a local model directory"
        )
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"])
    except Exception as e:  # noqa: BLE001 - network, authentication, a missing repository
        raise UserError(
            f"could not download hf:{repo_id} ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None


def _export_experts(f):
    from mole_jax.infer.export import export_experts

    m = export_experts(f.workdir, f.step, f.dtype, out=f.to or "experts")
    print(
        f"exported {len(m['layers'])} MoE layer(s) x {m['experts']} experts of step "
        f"{m['checkpoint_step']} to {m['location']} ({m['dtype']}), "
        f"{m['bytes_per_expert']} bytes per expert"
    )
    return m


def eval(f):  # noqa: A001 - the subcommand's name
    from mole_jax.eval.validation import MODE_NAMES, evaluate, record

    _need(f, "workdir")
    if f.tasks is not None:
        return _eval_tasks(f)
    if f.max_tokens is not None and f.max_tokens < 1:
        raise UserError(f"--max_tokens={f.max_tokens} must be positive")
    mode = _mode(f)
    out = evaluate(
        f.workdir, mode, corpus=f.data, step=f.step, max_tokens=f.max_tokens, write=False,
        **_store_option(f),
    )  # fmt: skip
    mode_name = MODE_NAMES.get(out["mode"], out["mode"])
    line = f"{mode_name} eval of step {out['step']}: loss {out['loss']:.4f}, ppl {out['ppl']:.2f}"
    if "lut_dtype" in out:
        line += f", {out['bytes_per_token']} bytes/token ({out['lut_dtype']})"
    if "bytes_read" in out:
        line += f", {out['bytes_read']} bytes read, cache hit rate {out['cache_hit_rate']:.2f}"
    if out.get("io_requests"):
        line += (
            f", storage: {out['io_requests'] / out['tokens']:.2f} requests and "
            f"{out['io_bytes'] / out['tokens']:,.0f} bytes per token"
        )
    print(line + f" over {out['tokens']} tokens", flush=True)  # before saving, which may fail
    record(f.workdir, mode, out)
    return out


def _eval_tasks(f):
    from mole_jax.eval.zero_shot import run_tasks, summary_line

    out = run_tasks(
        f.workdir,
        f.tasks,
        _mode(f),
        f.step,
        lut=_store_option(f).get("store"),
        limit=f.limit,
        num_fewshot=f.num_fewshot,
        include_path=f.include_path,
        allow_hub=f.allow_hub,
    )
    line = f"{out['mode']} tasks of step {out['step']}: {summary_line(out)}"
    if "bytes_read_per_token" in out:
        line += f"; {out['bytes_read_per_token']:.0f} bytes read per token"
    print(line + f" ({out['requests']} requests, {out['seconds']:.1f} s) -> {out['path']}")
    return out


def _store_option(f) -> dict:
    """{'store': --store} for the offloaded engines (none without --store)."""
    if f.store and not f.offload:
        raise UserError(f"--store={f.store} is read by the offloaded engines: add --offload")
    return {"store": f.store} if f.store else {}


def _mode(f) -> str:
    """The engine of `--offload`: a MoE's experts from its expert store (a pre-gated model's
    read ahead of its blocks), else the LUT rows."""
    from mole_jax.workdir import Workdir

    if not f.offload:
        return "experts"
    kind = model_config(Workdir(f.workdir).config).kind
    return {"moe": "moe_offload", "pregated": "lookahead"}.get(kind, "offload")


def generate(f):
    from mole_jax.data import pipeline
    from mole_jax.infer.engine import build_engine
    from mole_jax.infer.generate import generate as generate_tokens
    from mole_jax.stores.location import io_counters, io_since
    from mole_jax.workdir import Workdir

    _need(f, "workdir")
    _check_text("--prompt", f.prompt)
    wd = Workdir(f.workdir)
    vocab = model_config(wd.config).vocab_size
    if f.max_new < 1:
        raise UserError(f"--max_new={f.max_new}: generate at least 1 token")
    if not 0 <= f.top_k <= vocab:
        raise UserError(f"--top_k={f.top_k} must be in [0, {vocab}] (0: sample from all tokens)")
    if not f.temperature >= 0:
        raise UserError(f"--temperature={f.temperature} must be >= 0 (0 is greedy)")
    tok = wd.tokenizer()
    ids = pipeline.tokenize(tok, f.prompt) or [tok.token_to_id(pipeline.eos_token(tok))]
    engine = build_engine(wd, _mode(f), f.step, **_store_option(f))
    io_start = io_counters()
    out = generate_tokens(engine, [ids], f.max_new, f.temperature, f.top_k, f.seed)
    requests, nbytes = io_since(io_start)
    text = pipeline.detokenize(tok, out["tokens"][0])
    print(f.prompt + text)
    if f.offload:
        n = len(ids) + f.max_new - 1  # tokens fed through the model
        print(f"storage: {requests} requests, {nbytes:,} bytes for {n} tokens "
              f"({requests / n:.2f} requests, {nbytes / n:,.0f} bytes per token)")  # fmt: skip
    steps = out["step_s"]
    stats = {
        "prompt_tokens": len(ids),
        "new_tokens": f.max_new,
        "prefill_s": out["prefill_s"],
        "decode_ms_median": 1e3 * float(sorted(steps)[len(steps) // 2]) if steps else None,
        "text": text,
        "io_requests": requests,
        "io_bytes": nbytes,
    }
    stats.update(engine.stats())
    return stats


def sweep(f):
    from mole_jax.sweeps.runner import run_sweep

    _need(f, "config", "workdir")
    params = {}
    for item in f.slurm:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"--slurm={item}: give key=value (e.g. partition=gpu,timeout_min=600)")
        params[key] = value
    return run_sweep(
        f["config"].config_filename, f.config, f.workdir, f.parallel, f.dry_run, f.executor, params,
        f.store,
    )  # fmt: skip
