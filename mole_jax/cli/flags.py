"""Every flag of `launch.py`, and which commands take which (the per-command help reads it)."""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file and argument: path.py:arg.")
flags.DEFINE_string("workdir", None, "Run directory (config.json, metrics, checkpoints, lut/).")
flags.DEFINE_string("json", None, "Also write the result to this JSON file.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
flags.DEFINE_string(
    "dtype",
    "float16",
    "LUT: float32|float16|bfloat16|int8|nf4|nf3; --experts: float32|float16|bfloat16|int4|int3|"
    "int2.",
)
flags.DEFINE_bool("experts", False, "Export a MoE model's experts (offload baseline), not a LUT.")
flags.DEFINE_bool("offload", False, "Read LUT rows (MoLE) or experts (MoE) from their store.")
flags.DEFINE_string("data", None, "Corpus name or files:<glob> (default: the run's corpus).")
flags.DEFINE_integer("max_tokens", None, "At most this many tokens (default: the whole split).")
flags.DEFINE_string("prompt", "", "The prompt text.")
flags.DEFINE_integer("max_new", 64, "Tokens to sample.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely (0: all).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("parallel", 1, "Runs at a time.")
flags.DEFINE_bool("dry_run", False, "Print the runs with their sizes; train nothing.")
flags.DEFINE_enum(
    "executor", "local", ["local", "slurm", "submitit_local"],
    "Run here (local), as a SLURM job array, or through submitit's local executor.",
)  # fmt: skip
flags.DEFINE_list("slurm", [], "With --executor=slurm: key=value submitit/SLURM parameters.")
flags.DEFINE_string("coordinator", None, "Several hosts: HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "Several hosts: how many processes.")
flags.DEFINE_integer("process_id", None, "Several hosts: this process's index.")
flags.DEFINE_list("tasks", None, "lm-eval tasks to score (e.g. mole_offline) instead of loss.")
flags.DEFINE_integer("limit", None, "With --tasks: at most this many documents per task.")
flags.DEFINE_integer("num_fewshot", None, "With --tasks: examples in each prompt (default 0).")
flags.DEFINE_string("include_path", None, "With --tasks: a folder of your own lm-eval task YAMLs.")
flags.DEFINE_bool("allow_hub", False, "With --tasks: allow tasks whose data is on the HF hub.")
flags.DEFINE_string("from", None, "The trained dense workdir to convert.")
flags.DEFINE_string("platform", None, "Plan for cpu|gpu|tpu (default: this host's backend).")
flags.DEFINE_float("budget_gib", 80.0, "Device memory to plan against, GiB (80: H100 / A100-80G).")
FLAGS = flags.FLAGS

MULTIHOST = ("coordinator", "num_processes", "process_id")
LM_EVAL = ("tasks", "limit", "num_fewshot", "include_path", "allow_hub")
# command -> (what it does, a usage line, its flags, the config its --help lists when none is given)
COMMANDS: dict[str, tuple[str, str, tuple[str, ...], str | None]] = {
    "train": (
        "pretrain a config in a workdir; resumes from its newest good checkpoint",
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
    "export": (
        "write a trained model's routed experts to a store: a MoLE LUT, or a MoE's experts",
        "--workdir=runs/m [--dtype=float16|bfloat16|float32|int8|nf4|nf3] [--experts]",
        ("workdir", "step", "dtype", "experts", "json"),
        None,
    ),
    "eval": (
        "validation loss (or lm-eval task scores) of a workdir, in memory or offloaded",
        "--workdir=runs/m [--offload] [--data=CORPUS|files:GLOB] [--tasks=mole_offline]",
        ("workdir", "step", "offload", "data", "max_tokens", *LM_EVAL, "json"),
        None,
    ),
    "generate": (
        "sample text from a workdir, in memory or offloaded",
        '--workdir=runs/m --prompt="ROMEO:" [--offload] [--temperature=0.8 --top_k=40]',
        ("workdir", "prompt", "max_new", "temperature", "top_k", "seed", "offload", "step", "json"),
        None,
    ),
    "sweep": (
        "train, export and evaluate a study's runs, here or as a SLURM job array",
        "--config=experiments/kinds.py:size=small --workdir=runs/kinds [--parallel=N] [--dry_run]",
        ("config", "workdir", "parallel", "dry_run", "executor", "slurm"),
        None,
    ),
    "convert": (
        "turn a trained dense workdir into a pre-gated MoE (Read-ME's conversion)",
        "--from=runs/dense --workdir=runs/pg --config=configs/pregated.py:size=tiny,convert=1",
        ("from", "workdir", "config"),
        "configs/pregated.py:size=tiny,convert=1",
    ),
}
