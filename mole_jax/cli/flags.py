"""Every flag of `launch.py` (which command takes which: `help.COMMANDS`). Importing this module
defines the flags in absl's global registry, so only `launch.py` imports it."""

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
flags.DEFINE_bool(
    "allow_hub", False, "Allow downloads from the HF hub: lm-eval tasks' data, import --from=hf:."
)
flags.DEFINE_string(
    "from", None, "convert: the trained dense workdir; import: a Hugging Face model directory."
)
flags.DEFINE_string("tokenizer", None, "import: the tokenizer.json, when the directory has none.")
flags.DEFINE_enum(
    "format", "store", ["store", "hf"],
    "export: a store for offloading (LUT or experts), or a Hugging Face directory (--to).",
)  # fmt: skip
flags.DEFINE_string(
    "to", None,
    "export: where the store goes, a name under the workdir, a folder or a URL (s3://, gs://; "
    "default lut, or experts); with --format=hf the directory to write.",
)  # fmt: skip
flags.DEFINE_enum(
    "layout", None, ["layers", "packed"],
    "export: a LUT's rows as an array per layer, or packed (every layer's row of a token in one "
    "read; default packed for s3:// and gs://, layers for a folder).",
)  # fmt: skip
flags.DEFINE_string(
    "store", None,
    "eval/generate --offload: the store to read, a name under the workdir (default lut, or "
    "experts), a folder or a URL (s3://, gs://, http(s)://; see docs/offloading.md); sweep: a "
    "folder or URL under which each run's LUTs go (<store>/<run>/lut_<dtype>).",
)  # fmt: skip
flags.DEFINE_string("platform", None, "Plan for cpu|gpu|tpu (default: this host's backend).")
flags.DEFINE_float("budget_gib", 80.0, "Device memory to plan against, GiB (80: H100 / A100-80G).")
FLAGS = flags.FLAGS
flags.DEFINE_string(
    "topology", None, "v5p:4x4x4 | v6e:4x4 | v5e:2x2 | v4:2x2x2 | h100:1x8x8 | a100:1x2x8."
)
flags.DEFINE_integer("num_slices", 1, "TPU slices joined over DCN (multi-slice).")
