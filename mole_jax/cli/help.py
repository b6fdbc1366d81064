"""`launch.py -h` (the commands) and `launch.py <command> --help` (that command's flags and, for
a command that takes a config, every `--config.*` field with its default and type, read from the
ml_collections config itself)."""

from __future__ import annotations

from pathlib import Path

import ml_collections

MULTIHOST = ("coordinator", "num_processes", "process_id")
LM_EVAL = ("tasks", "limit", "num_fewshot", "include_path", "allow_hub")
# command -> (what it does, a usage line, its flags, the config its --help lists when none is given)
COMMANDS: dict[str, tuple[str, str, tuple[str, ...], str | None]] = {
    "train": (
        "pretrain a config in a workdir (or fine-tune one: --workdir alone takes its config); "
        "resumes from its newest good checkpoint",
        "--config=configs/mole.py:size=tiny,experts=4 --workdir=runs/m [--config.train.steps=200]",
        ("config", "workdir", *MULTIHOST),
        "configs/mole.py",
    ),
    "summary": (
        "parameters, FLOPs and bytes per device of a config, without allocating anything",
        "--config=configs/mole.py:size=160m,experts=16 [--config.mesh.fsdp=64] [--json=FILE]",
        ("config", "platform", "budget_gib", "json"),
        "configs/mole.py",
    ),
    "compile": (
        "compile the train step for a TPU/GPU target here: memory, fit, collectives, step time",
        "--config=configs/moe.py:size=1b,experts=34 --topology=h100:1x8x8|v5p:4x4x4",
        ("config", "topology", "num_slices", "json"),
        "configs/moe.py",
    ),
    "export": (
        "write a model's routed experts to a store (a MoLE LUT, a MoE's experts), or the model "
        "as a Hugging Face directory",
        "--workdir=runs/m [--dtype=float16|bfloat16|float32|int8|nf4|nf3] [--experts] "
        "[--to=NAME|DIR|s3://B/P] [--layout=layers|packed] [--format=hf --to=DIR]",
        ("workdir", "step", "dtype", "experts", "to", "layout", "format", "json"),
        None,
    ),
    "eval": (
        "validation loss (or lm-eval task scores) of a workdir, in memory or offloaded",
        "--workdir=runs/m [--offload [--store=NAME|URL]] [--data=CORPUS|files:GLOB] "
        "[--tasks=mole_offline]",
        ("workdir", "step", "offload", "store", "data", "max_tokens", *LM_EVAL, "json"),
        None,
    ),
    "generate": (
        "sample text from a workdir, in memory or offloaded",
        '--workdir=runs/m --prompt="ROMEO:" [--offload] [--temperature=0.8 --top_k=40]',
        (
            "workdir",
            "prompt",
            "max_new",
            "temperature",
            "top_k",
            "seed",
            "offload",
            "store",
            "step",
            "json",
        ),  # fmt: skip
        None,
    ),
    "sweep": (
        "train, export and evaluate a study's runs, here or as a SLURM job array",
        "--config=experiments/kinds.py:size=small --workdir=runs/kinds [--parallel=N] [--dry_run]",
        ("config", "workdir", "parallel", "dry_run", "executor", "slurm", "store"),
        None,
    ),
    "convert": (
        "turn a trained dense workdir into a pre-gated MoE (Read-ME's conversion)",
        "--from=runs/dense --workdir=runs/pg --config=configs/pregated.py:size=tiny,convert=1",
        ("from", "workdir", "config"),
        "configs/pregated.py:size=tiny,convert=1",
    ),
    "import": (
        "turn a Hugging Face model (the MoLE release, Llama, Mixtral) into a workdir",
        "--from=DIR|hf:REPO --workdir=runs/imported [--tokenizer=FILE] [--allow_hub]",
        ("from", "workdir", "tokenizer", "config", "allow_hub", "json"),
        None,
    ),
}

HELP = ("-h", "--help", "-help", "--helpfull", "--helpshort")
ROOT = Path(__file__).resolve().parents[2]


def overview() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: launch.py COMMAND [flags]    (launch.py COMMAND --help: its flags)", ""]
    lines += [f"  {name:<{width}}  {what}" for name, (what, *_) in COMMANDS.items()]
    return "\n".join(lines)


def config_fields(cfg: ml_collections.ConfigDict, prefix: str = "config") -> list[str]:
    """`--config.a.b=DEFAULT  (type)` for every leaf field, in the config's order."""
    out = []
    for key in cfg.keys():
        value = cfg[key]
        if isinstance(value, ml_collections.ConfigDict):
            out += config_fields(value, f"{prefix}.{key}")
            continue
        kind = cfg.get_type(key) if hasattr(cfg, "get_type") else type(value)
        name = getattr(kind, "__name__", str(kind))
        shown = "(unset)" if value is None else repr(value) if isinstance(value, str) else value
        out.append(f"  --{prefix}.{key}={shown}  ({name})")
    return out


def command_help(command: str, cfg: ml_collections.ConfigDict | None, cfg_name: str | None) -> str:
    from mole_jax.cli.flags import FLAGS

    what, usage, names, default = COMMANDS[command]
    lines = [f"usage: launch.py {command} {usage}", "", what]
    lines += ["", "flags:"]
    for n in names:
        flag = FLAGS[n]
        default_text = "" if flag.default in (None, "", []) else f" (default: {flag.default})"
        lines.append(f"  --{n}: {flag.help}{default_text}")
    if cfg is None and default:
        cfg_name = default
        cfg = load_config(default)
    if cfg is not None:
        lines += ["", f"config fields of {cfg_name} (override any with --config.FIELD=VALUE):"]
        lines += config_fields(cfg)
    return "\n".join(lines)


def load_config(spec: str) -> ml_collections.ConfigDict | None:
    from mole_jax.config import load_file

    path = spec.partition(":")[0]
    if not (Path(path).exists() or (ROOT / path).exists()):
        return None
    return load_file(spec if Path(path).exists() else str(ROOT / spec))


def show(argv: list[str], parse) -> int:
    """Prints the help `argv` asks for; `parse(argv)` parses the other flags (for `--config`)."""
    command = next((a for a in argv[1:] if a in COMMANDS), None)
    if command is None:
        print(overview())
        return 0
    rest = [a for a in argv if a not in HELP]
    given = [a.partition("=")[2] for a in rest if a.startswith("--config=")]
    cfg = name = None
    if given:
        from mole_jax.cli.flags import FLAGS

        parse(rest)
        cfg, name = FLAGS.config, given[-1]
    print(command_help(command, cfg, name))
    return 0
