"""`launch.py -h` (the commands) and `launch.py <command> --help` (that command's flags and, for
a command that takes a config, every `--config.*` field with its default and type, read from the
ml_collections config itself)."""

from __future__ import annotations

from pathlib import Path

import ml_collections

from mole_jax.cli.flags import COMMANDS, FLAGS

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
        parse(rest)
        cfg, name = FLAGS.config, given[-1]
    print(command_help(command, cfg, name))
    return 0
