"""Import memory: peak RSS of `launch.py import` on a synthetic 410M-shaped checkpoint.

    python experiments/bench_import.py [--size=410m]

Writes a random Dense-410M-shaped checkpoint in the official MoLE family's names (V=50,304,
D=1,024, 24 layers, F=4,096; float32 safetensors in shards of 512 MiB, written shard by shard)
and imports it in fresh processes: on one host device, and on 8 host devices with fsdp=8. Each
run's peak RSS (VmHWM) is taken twice: when the parameters are read and placed, and at the end
(the step-0 checkpoint written by orbax). Each is compared with what a streaming import may
hold: the process's own baseline (the whole command on the tiny fixture: Python, jax, orbax)
+ the model's bytes (its parameters on the host devices) + 1.3x the largest tensor (the one in
flight). Writes experiments/results/interop/bench_import.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flax import nnx  # noqa: E402

from mole_jax.config import SIZES  # noqa: E402
from mole_jax.interop import families  # noqa: E402
from mole_jax.model.backbone import abstract_model  # noqa: E402
from mole_jax.model.config import ModelConfig  # noqa: E402

OUT = ROOT / "experiments" / "results" / "interop" / "bench_import.json"
FIXTURE = ROOT / "tests" / "fixtures" / "hf" / "mole-dense"


def shape_config(size: str) -> ModelConfig:
    s = SIZES[size]
    return ModelConfig(
        vocab_size=s["vocab_size"],
        d_model=s["d_model"],
        n_layers=s["n_layers"],
        n_heads=s["n_heads"],
        d_ff=s["d_ff"],
        max_seq_len=2048,
        rope_theta=10000.0,
        init_std=0.02,
        norm_eps=1e-5,
        activation="gelu",
        dtype="float32",
    )


def write_checkpoint(d: Path, m: ModelConfig, shard_bytes: int = 2**29) -> dict:
    """The checkpoint, one shard in memory at a time; returns its sizes."""
    from safetensors.numpy import save_file

    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    plan = families.tensors(m)
    params = nnx.to_pure_dict(nnx.state(abstract_model(m), nnx.Param))
    shape = {}
    for t in plan:
        leaf = params
        for key in t.path:
            leaf = leaf[key]
        dims = leaf.shape[1:] if t.expert is not None else leaf.shape
        shape[t.hf] = tuple(dims[::-1]) if t.transpose else tuple(dims)
    groups, size = [[]], 0
    for t in plan:
        nbytes = 4 * int(np.prod(shape[t.hf]))
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t.hf)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: rng.standard_normal(shape[n], np.float32) * 0.02 for n in names}
        save_file(tensors, str(d / file), {"format": "pt"})
        weight_map.update({n: file for n in names})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = families.hf_config(m)
    (d / "config.json").write_text(json.dumps(config))
    shutil.copy(FIXTURE / "tokenizer.json", d / "tokenizer.json")
    sizes = [4 * int(np.prod(s)) for s in shape.values()]
    return dict(model_bytes=sum(sizes), largest_tensor_bytes=max(sizes), files=len(groups))


def run_import(src: Path, w: Path, devices: int) -> dict:
    """One `launch.py import` in a fresh process (this script's --child mode): its peak RSS once
    the parameters are read and placed, and at the end (the step-0 checkpoint written)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    args = [f"--from={src}", f"--workdir={w}", "--config=configs/dense.py:size=tiny"]
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        args += ["--config.mesh.data=1", f"--config.mesh.fsdp={devices}"]
    report = w.parent / "peaks.json"
    cmd = [sys.executable, __file__, "--child", str(report), "--", "import", *args]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"import failed: {out.stderr[-2000:]}")
    return dict(devices=devices, **json.loads(report.read_text()), seconds=round(seconds, 1))


def _peak_rss() -> int:
    """This process's peak resident set (VmHWM), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM in /proc/self/status (Linux only)")


def child(report: str, argv: list) -> None:
    """`launch.py <argv>` in this process, noting the peak RSS when `place` returns."""
    from mole_jax.cli.main import cli
    from mole_jax.interop import hf_import

    peaks, place = {}, hf_import.place

    def placed(*a, **k):
        out = place(*a, **k)
        peaks["placed_peak_rss_bytes"] = _peak_rss()
        return out

    hf_import.place = placed
    sys.argv = ["launch.py", *argv]
    try:
        cli()
    except SystemExit as e:
        if e.code:
            raise
    Path(report).write_text(json.dumps(dict(peaks, peak_rss_bytes=_peak_rss())))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="410m")
    ap.add_argument("--child", help="(internal) one import in this process; report path")
    args, rest = ap.parse_known_args()
    if args.child:
        return child(args.child, [a for a in rest if a != "--"])
    m = shape_config(args.size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        sizes = write_checkpoint(src, m)
        for label, path, devices in (
            ("baseline (tiny fixture)", FIXTURE, 1),
            (args.size, src, 1),
            (f"{args.size}, fsdp=8", src, 8),
        ):
            w = Path(tmp) / f"w{len(rows)}" / "w"
            w.parent.mkdir()
            rows.append(dict(run=label, **run_import(path, w, devices)))
            shutil.rmtree(w.parent)
    base = rows[0]["peak_rss_bytes"]
    bound = sizes["model_bytes"] + int(1.3 * sizes["largest_tensor_bytes"])
    for r in rows[1:]:
        r["placed_above_baseline_bytes"] = r["placed_peak_rss_bytes"] - base
        r["above_baseline_bytes"] = r["peak_rss_bytes"] - base
        r["bound_bytes"] = bound
        r["placed_within_bound"] = r["placed_above_baseline_bytes"] <= bound
        r["within_bound"] = r["above_baseline_bytes"] <= bound
    record = dict(
        command=f"python experiments/bench_import.py --size={args.size}",
        size=args.size,
        **sizes,
        rows=rows,
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    gib = 2**30
    print(
        f"model {sizes['model_bytes'] / gib:.2f} GiB, largest tensor "
        f"{sizes['largest_tensor_bytes'] / gib:.3f} GiB, {sizes['files']} files"
    )
    print(
        "| run | placed: above baseline (GiB) | whole import: peak RSS | above baseline | "
        "bound (GiB) | placed within | whole within | s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        above = r.get("above_baseline_bytes")
        cells = [
            "-" if above is None else f"{r['placed_above_baseline_bytes'] / gib:.2f}",
            f"{r['peak_rss_bytes'] / gib:.2f}",
            "-" if above is None else f"{above / gib:.2f}",
            "-" if above is None else f"{r['bound_bytes'] / gib:.2f}",
            "-" if above is None else str(r["placed_within_bound"]),
            "-" if above is None else str(r["within_bound"]),
            str(r["seconds"]),
        ]
        print(f"| {r['run']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
