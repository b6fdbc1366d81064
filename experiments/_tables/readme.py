"""The README's generated blocks: the command table (from `mole_jax.cli.flags.COMMANDS`, the same
table `launch.py --help` prints) and the one-screen "how well" table, each figure read from the
JSON of the benchmark that measured it."""

from __future__ import annotations

from _tables import load, markdown, renderer


@renderer("commands")
def commands() -> str:
    from mole_jax.cli.help import COMMANDS

    rows = [  # a | inside a cell, code or not, must be escaped in a markdown table
        [f"`{name}`", what, "`" + usage.replace("|", "\\|") + "`"]
        for name, (what, usage, *_) in COMMANDS.items()
    ]
    return markdown(["command", "what it does", "example"], rows)


def _row(rows: list[dict], model: str, batch: int) -> dict:
    return next(r for r in rows if r["model"] == model and r["batch"] == batch)


def _train_ratio(path: str, a: str, b: str) -> float:
    rows = {r.get("name", r["kind"]): r for r in load(path)["rows"]}
    return rows[a]["step_time_s"] / rows[b]["step_time_s"]


@renderer("headlines")
def headlines() -> str:
    """A few measured figures, each with the page that has the whole table."""
    off = load("bench_offload.json")["results"]
    mem, lut = _row(off, "MoLE-4E LUT in memory fp16", 1), _row(off, "MoLE-4E offloaded fp16", 1)
    nocache = _row(off, "MoLE-4E offloaded fp16, no row cache", 1)
    moe = _row(off, "MoE-10E offloaded fp16, LRU 4/layer + prefetch", 1)
    nf4 = _row(off, "MoLE-4E offloaded nf4", 1)
    runs = [r for name in ("faults.json", "faults_later.json")
            for v in load(name)["faults"].values() for r in v]  # fmt: skip
    injected, lost = len(runs), sum(r["lost"] for r in runs)
    tracebacks = sum(r["tracebacks"] for r in runs)
    v1024 = "bench_train_small_v1024.json"
    rows = [
        [
            "MoLE training cost (small, 8,192 tokens/step)",
            f"{_train_ratio(v1024, 'mole-4e', 'dense'):.2f}x dense's step time, "
            f"{_train_ratio(v1024, 'mole-4e per_position', 'mole-4e'):.2f}x faster than "
            "computing the experts per position",
            "[benchmarks](docs/benchmarks.md#training-throughput-experimentsbench_trainpy)",
        ],
        [
            "MoLE-4E decoding with its LUT offloaded (batch 1)",
            f"{lut['decode_ms_median']:.2f} ms/token vs {mem['decode_ms_median']:.2f} in memory; "
            f"{lut['bytes_per_token']:,.0f} B/token read with the row cache, "
            f"{nocache['bytes_per_token']:,.0f} without; "
            + ("the same loss" if lut["val_loss"] == mem["val_loss"] else "a different loss"),
            "[benchmarks](docs/benchmarks.md#offloaded-inference-experimentsbench_offloadpy)",
        ],
        [
            "MoE-10E decoding with its experts offloaded (batch 1)",
            f"{moe['decode_ms_median']:.2f} ms/token, {moe['bytes_per_token'] / 2**20:.2f} MiB "
            "read per token (LRU + speculative prefetch)",
            "[benchmarks](docs/benchmarks.md#offloaded-inference-experimentsbench_offloadpy)",
        ],
        [
            "NF4 LUT against fp16",
            f"validation loss {nf4['val_loss']:.4f} vs {lut['val_loss']:.4f}",
            "[offloading](docs/offloading.md)",
        ],
        [
            "fault campaign (kills, corruption, full disk, bad input)",
            f"{injected} faults: {lost} lost, {tracebacks} tracebacks",
            "[reliability](docs/reliability.md)",
        ],
    ]
    return markdown(["what", "measured (2 CPU cores)", "details"], rows)
