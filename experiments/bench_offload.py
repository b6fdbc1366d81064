"""Offloaded inference: decode latency, bytes moved and quality of MoLE's LUTs against MoE experts.

Question: with its routed parameters on storage, how fast does each model decode, how many bytes
does a token pull from storage, and what does it cost in quality? (MoLE paper, latency study.)
Expected: MoLE offloaded decodes about as fast as dense (it reads E·D values per layer per
token) and faster than MoE with offloaded experts (2·D·F_e values per expert it misses), with
about 2·F_e/E (here 2D) times fewer bytes per token.

    python experiments/bench_offload.py [--size=small] [--train_steps=200] [--batches=1,8,32]
        [--prompt=128] [--new=32] [--capacity=4] [--page_cache=warm|cold]

Models of the same activated size, trained here (or reused) under --root: dense, MoE-10E top-2
(experts F/2) and MoLE-4E. Rows: dense; MoE in memory; MoE offloaded (float16 experts in
tensorstore, per-layer LRU of --capacity experts, speculative prefetch); MoLE with its float16
LUT in memory; MoLE offloaded with float16 and nf4 LUTs (row cache of --cache_rows tokens), and
with float16 and the row cache off (rows are asked of the store every step; tensorstore's pool,
sized for the shard indexes, may still hold a few, which the measured I/O column shows).

Method: prompts are validation windows; one untimed decode per engine compiles every shape and
one more, alone, gives the storage columns; then --rounds rounds each run one greedy decode of
--new tokens per engine from empty caches, the engines advanced in lockstep (one step of each in
turn, so that load drifting on this shared machine lands on all of them alike; each round starts
with the next engine, so none always follows the same one), every step timed
and blocked on its logits; medians and p95 pool the steps of all rounds. Bytes per token: the
rows (MoLE) or experts (MoE) asked of the store during the decode steps divided by the tokens
fed through them (prefill: by the prompt tokens); "measured I/O" is what
the process really read (Linux rchar) over the decode steps, shard indexes included and rows
tensorstore still held excluded. Quality is the loss of the same engine over the validation
windows. `cold` drops the store files from the OS page cache (posix_fadvise DONTNEED) before
every forward call, untimed; `warm` leaves them cached (the stores were just written or read).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import _paths  # noqa: F401
import numpy as np
from _stores import drop_page_cache, fresh
from _tables.bench import offload_markdown
from absl import app, flags, logging

from configs import dense, moe, mole
from mole_jax.eval.validation import val_batches
from mole_jax.infer.engine import build_engine
from mole_jax.infer.export import export_experts, export_lut
from mole_jax.infer.generate import generate, generate_steps
from mole_jax.stores.experts import ExpertStore
from mole_jax.stores.lut import LutStore
from mole_jax.train import loop

flags.DEFINE_string("size", "small", "Model size of all three models.")
flags.DEFINE_integer("train_steps", 200, "Training steps for models not yet trained under --root.")
flags.DEFINE_string("root", "runs/bench_offload", "Workdirs of the dense, moe and mole models.")
flags.DEFINE_list("batches", ["1", "8", "32"], "Decode batch sizes.")
flags.DEFINE_integer("prompt", 128, "Prompt length (tokens).")
flags.DEFINE_integer("new", 32, "Tokens generated per sequence.")
flags.DEFINE_integer("rounds", 7, "Timed decodes per engine and batch, interleaved across engines.")
flags.DEFINE_integer("capacity", 4, "MoE offload: experts cached per layer (LRU).")
flags.DEFINE_bool("prefetch", True, "MoE offload: speculative prefetch of the next layer.")
flags.DEFINE_integer("cache_rows", 4096, "MoLE offload: token rows cached (LRU).")
flags.DEFINE_enum("page_cache", "warm", ["warm", "cold"], "OS page cache state of the stores.")
flags.DEFINE_integer("eval_batches", 4, "Validation batches for the quality column.")
flags.DEFINE_string("out", "experiments/results/bench_offload", "Writes OUT.json, .md and .png.")
FLAGS = flags.FLAGS

CONFIGS = {"dense": (dense, ""), "moe": (moe, ",experts=10,topk=2"), "mole": (mole, ",experts=4")}


def ensure_models(root: Path, size: str, steps: int) -> dict[str, str]:
    """Trains what is missing (resuming what is partial) and exports the stores the rows read."""
    dirs = {}
    for kind, (module, extra) in CONFIGS.items():
        w = str(root / kind)
        cfg = module.get_config(f"size={size}{extra}")
        cfg.train.steps, cfg.train.progress = steps, False
        print(f"[{kind}] training {size} for {steps} steps in {w} (resumes if present)", flush=True)
        loop.run(cfg, w)
        dirs[kind] = w
    for dtype in ("float16", "nf4"):
        fresh(
            LutStore,
            dirs["mole"],
            f"lut_{dtype}",
            lambda d=dtype: export_lut(dirs["mole"], dtype=d, out=f"lut_{d}"),
        )
    fresh(
        ExpertStore,
        dirs["moe"],
        "experts_float16",
        lambda: export_experts(dirs["moe"], dtype="float16", out="experts_float16"),
    )
    return dirs


def engines(dirs: dict[str, str]):
    """(row name, store dir or None, engine factory) for every row of the table."""
    k, rows = FLAGS.capacity, FLAGS.cache_rows
    return [
        ("dense", None, lambda: build_engine(dirs["dense"])),
        ("MoE-10E in memory", None, lambda: build_engine(dirs["moe"])),
        (
            f"MoE-10E offloaded fp16, LRU {k}/layer" + (" + prefetch" if FLAGS.prefetch else ""),
            f"{dirs['moe']}/experts_float16",
            lambda: build_engine(
                dirs["moe"],
                "moe_offload",
                store="experts_float16",
                capacity=k,
                prefetch=FLAGS.prefetch,
            ),
        ),
        (
            "MoLE-4E LUT in memory fp16",
            None,
            lambda: build_engine(dirs["mole"], "lut_memory", store="lut_float16"),
        ),
        (
            "MoLE-4E offloaded fp16",
            f"{dirs['mole']}/lut_float16",
            lambda: build_engine(dirs["mole"], "offload", store="lut_float16", cache_rows=rows),
        ),
        (
            "MoLE-4E offloaded fp16, no row cache",
            f"{dirs['mole']}/lut_float16",
            lambda: build_engine(dirs["mole"], "offload", store="lut_float16", cache_rows=0),
        ),
        (
            "MoLE-4E offloaded nf4",
            f"{dirs['mole']}/lut_nf4",
            lambda: build_engine(dirs["mole"], "offload", store="lut_nf4", cache_rows=rows),
        ),
    ]


def read_bytes() -> int | None:
    """Bytes this process has read through read()/pread() so far (Linux /proc/self/io rchar,
    page-cache hits included; the measure of the shipped results: `io_counters` in
    mole_jax/stores/location.py counts the same for folders and object storage alike)."""
    try:
        with open("/proc/self/io", "rb") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(b"rchar:"))
    except (OSError, StopIteration):
        return None


def storage_pass(engine, store_dir, prompts, new: int) -> dict:
    """One greedy decode from empty caches, alone, for the storage columns: bytes asked of the
    store and bytes the process really read (rchar), during the prefill and the decode steps."""
    engine.reset_stats()
    mark = {}

    def before(t):
        if t == 1:
            mark["io"], mark["bytes"] = read_bytes(), engine.stats().get("bytes_read", 0)
        if FLAGS.page_cache == "cold" and store_dir:
            drop_page_cache(store_dir)

    generate(engine, prompts, new, before_step=before)
    io = read_bytes() - mark["io"] if mark["io"] is not None else float("nan")
    generated = prompts.shape[0] * (new - 1)  # tokens fed through the decode steps
    stats = engine.stats()
    out = dict(
        bytes_per_token=(stats.get("bytes_read", 0) - mark["bytes"]) / generated,
        io_bytes_per_token=io / generated,
        prefill_bytes_per_token=mark["bytes"] / prompts.size,
    )
    if "cache_hit_rate" in stats:
        out["cache_hit_rate"] = stats["cache_hit_rate"]
    return out


def timed_round(built, prompts, new: int, start: int = 0) -> dict[str, dict]:
    """One greedy decode per engine from empty caches, the engines advanced in lockstep (one
    step of each in turn, beginning with engine `start`) so that load drifting on the machine
    lands on all of them alike."""
    live, results = {}, {}
    for name, store_dir, engine in built[start:] + built[:start]:
        engine.reset_stats()

        def before(t, store_dir=store_dir):
            if FLAGS.page_cache == "cold" and store_dir:
                drop_page_cache(store_dir)

        live[name] = generate_steps(engine, prompts, new, before_step=before)
    while live:
        for name in list(live):
            try:
                next(live[name])
            except StopIteration as done:
                del live[name]
                results[name] = done.value
    return results


def run_all(dirs) -> list[dict]:
    """Every engine at every batch size: storage columns from one decode each, latency from
    --rounds lockstep rounds, pooled."""
    val = list(val_batches(dirs["dense"], n_batches=64))
    windows = np.concatenate(val)[:, : FLAGS.prompt]
    if windows.shape[1] < FLAGS.prompt:
        raise SystemExit(f"--prompt={FLAGS.prompt} is longer than the validation windows")
    quality = val[: FLAGS.eval_batches]
    built = [(name, store_dir, make()) for name, store_dir, make in engines(dirs)]
    losses = {name: float(np.mean([e.loss(b) for b in quality])) for name, _, e in built}
    results = []
    for b in (int(x) for x in FLAGS.batches):
        if b > len(windows):
            raise SystemExit(f"only {len(windows)} validation windows for batch {b}")
        prompts = windows[:b]
        rows = {}
        for name, store_dir, engine in built:
            generate(engine, prompts, FLAGS.new)  # compiles every shape the timed runs meet
            rows[name] = dict(model=name, val_loss=losses[name], batch=b)
            rows[name].update(storage_pass(engine, store_dir, prompts, FLAGS.new))
            rows[name]["resident_bytes"] = engine.resident_bytes()
        n = len(built)
        rounds = [timed_round(built, prompts, FLAGS.new, r % n) for r in range(FLAGS.rounds)]
        for name, row in rows.items():
            steps = np.concatenate([r[name]["step_s"] for r in rounds]) * 1e3
            row.update(
                decode_ms_median=float(np.median(steps)),
                decode_ms_p95=float(np.percentile(steps, 95)),
                prefill_s=float(np.median([r[name]["prefill_s"] for r in rounds])),
            )
            print(_line(row), flush=True)
            results.append(row)
    order = [name for name, _, _ in built]
    return sorted(results, key=lambda r: order.index(r["model"]))  # stable: batches in order


def _line(r: dict) -> str:
    return (
        f"{r['model']:<44} B={r['batch']:<3} decode {r['decode_ms_median']:8.2f} ms "
        f"(p95 {r['decode_ms_p95']:8.2f})  prefill {r['prefill_s'] * 1e3:8.1f} ms  "
        f"{r['bytes_per_token']:12.0f} B/token  resident {r['resident_bytes'] / 2**20:7.1f} MiB  "
        f"val {r['val_loss']:.4f}"
    )


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["model"] for r in results):
        rs = [r for r in results if r["model"] == name]
        ax1.plot([r["batch"] for r in rs], [r["decode_ms_median"] for r in rs], "o-", label=name)
        if any(r["bytes_per_token"] for r in rs):
            ax2.plot([r["batch"] for r in rs], [r["bytes_per_token"] for r in rs], "o-", label=name)
    ax1.set(xscale="log", xlabel="batch", ylabel="decode step, ms (median)", title="latency")
    ax2.set(
        xscale="log",
        yscale="log",
        xlabel="batch",
        ylabel="bytes read per token",
        title="storage traffic",
    )
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(_):
    logging.set_verbosity(logging.WARNING)
    dirs = ensure_models(Path(FLAGS.root), FLAGS.size, FLAGS.train_steps)
    t0 = time.time()
    results = run_all(dirs)
    meta = dict(
        size=FLAGS.size,
        prompt=FLAGS.prompt,
        new=FLAGS.new,
        rounds=FLAGS.rounds,
        page_cache=FLAGS.page_cache,
        capacity=FLAGS.capacity,
        prefetch=FLAGS.prefetch,
        cache_rows=FLAGS.cache_rows,
        machine=f"{platform.machine()} CPU x{os.cpu_count()}",
        seconds=time.time() - t0,
    )
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out + ".json", "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=2)
    md = offload_markdown(results, meta)
    Path(FLAGS.out + ".md").write_text(md)
    plot(results, FLAGS.out + ".png")
    print("\n" + md + f"\nwrote {FLAGS.out}.json, .md, .png")


if __name__ == "__main__":
    app.run(main)
