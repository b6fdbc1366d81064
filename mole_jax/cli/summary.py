"""What `launch.py summary` prints: the accounting in human units, the assumptions the memory
plan made (devices, micro-batches, remat, backend), and — when the step does not fit a device —
the fewest micro-batches, or else the smallest FSDP mesh, that would (`memory.fit`). And what
`launch.py compile` prints of its report (`train.aot`)."""

from __future__ import annotations

import copy
import math

from mole_jax.train import memory

MESHES = (8, 16, 32, 64, 128, 256, 512, 1024)


def count(v: int) -> str:
    """1,068,347,136 (1.07 B)."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if v >= size:
            return f"{v:,} ({v / size:.3g} {unit})"
    return f"{v:,}"


def nbytes(v: float) -> str:
    """3.98 GiB, 288 KiB."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if v >= size:
            return f"{v / size:,.2f} {unit}"
    return f"{v:.0f} B"


def render(cfg, s: dict, budget_gib: float) -> str:
    width = 26
    rows = [("kind", s["kind"])]
    for key in ("params_total", "params_resident", "params_active_per_token", "flops_per_token",
                "train_flops_per_token"):  # fmt: skip
        rows.append((key, count(s[key])))
    rows += [("seq_len", s["seq_len"]), ("vocab_size", f"{s['vocab_size']:,}")]
    if "lut_values" in s:
        rows.append(("lut_values", count(s["lut_values"])))
        rows.append(("lut_values_per_token", count(s["lut_values_per_token"])))
        for dt, b in s["lut_bytes"].items():
            per = s["lut_bytes_per_token"][dt]
            rows.append((f"lut[{dt}]", f"{nbytes(b)} in all, {nbytes(per)} per token"))
    lines = [f"{k:<{width}}{v}" for k, v in rows]
    if "bytes_per_device" in s:
        lines += ["", *memory_lines(cfg, s, budget_gib)]
    return "\n".join(lines)


def memory_lines(cfg, s: dict, budget_gib: float) -> list[str]:
    sizes, plan, t, backend = s["mesh"], s["bytes_per_device"], cfg.train, s["platform"]
    devices = math.prod(sizes.values())
    parts = ", ".join(f"{k} {nbytes(v)}" for k, v in plan.items() if k != "total")
    mesh = " ".join(f"{a}={n}" for a, n in sizes.items())
    micro = f"{t.microbatches} micro-batch" + ("es" if t.microbatches > 1 else "")
    lines = [
        f"memory per device (closed-form plan): {nbytes(plan['total'])} ({parts})",
        f"  assumed: {devices} device{'s' if devices > 1 else ''}, mesh {mesh}; batch "
        f"{t.batch_size} x {cfg.data.seq_len} tokens in {micro}; remat={cfg.model.remat}, "
        f"dtype={cfg.model.dtype}, platform={backend} (--platform)",
    ]
    if backend in memory.CALIBRATION:
        kind = cfg.model.ffn.kind
        lines.append(
            f"  activations calibrated x{memory.calibration(backend, kind):g} against the compiled "
            f"paper configurations ({kind}); the compiler's own figure: launch.py compile "
            f"--topology=... (docs/scaling.md)"
        )
    budget = budget_gib * 2**30
    if plan["total"] <= budget:
        return [*lines, f"  fits in {budget_gib:g} GiB per device"]
    lines.append(f"  does not fit in {budget_gib:g} GiB per device (--budget_gib sets the budget)")
    fitted, micro = memory.fit(cfg, sizes, budget, backend)
    if micro:
        return [*lines, f"  fits with --config.train.microbatches={micro} "
                        f"({nbytes(fitted['total'])} per device)"]  # fmt: skip
    for n in MESHES:
        trial = copy.deepcopy(cfg)
        trial.mesh.update(data=1, fsdp=n, expert=1, tensor=1)
        if t.batch_size % n:
            continue
        fitted, micro = memory.fit(trial, memory.mesh_sizes(trial.mesh), budget, backend)
        if micro:
            flags = f"--config.mesh.data=1 --config.mesh.fsdp={n} --config.train.microbatches="
            flags += str(micro)
            return [*lines, f"  fits on {n} devices with {flags} ({nbytes(fitted['total'])} each)"]
    return [*lines, f"  fits no FSDP mesh up to {MESHES[-1]} devices at any micro-batch count"]


def render_compile(r: dict) -> str:
    """`launch.py compile`'s table: the compiled step per device, its fit and its roofline."""
    mesh = " ".join(f"{a}={n}" for a, n in r["mesh"].items())
    lines = [
        f"{r['topology']}: {r['devices']} x {r['device_kind']} ({r['hosts']} host(s)), mesh {mesh}",
        f"  batch {r['batch'][0]} x {r['batch'][1]} in {r['microbatches']} micro-batch(es), "
        f"scan_layers={r['scan_layers']}, remat={r['remat']}",
        f"  compile: {r['seconds']['compile']} s (lower {r['seconds']['lower']} s), "
        f"host peak RSS {r.get('host_peak_rss_gib', 0):.2f} GiB",
    ]
    if not r["compiled"]:
        return "\n".join([*lines, f"  does NOT fit: the compiler needs "
                          f"{nbytes(r['needed_temporaries'])} of temporaries per device "
                          f"({nbytes(r['device_memory'])} HBM): {r['error']}"])  # fmt: skip
    m = r["memory_per_device"]
    verdict = "fits" if r["fits"] else "does NOT fit"
    lines.append(
        f"  per device: arguments {nbytes(m['argument_size'])}, outputs {nbytes(m['output_size'])}"
        f", temporaries {nbytes(m['temp_size'])}, peak {nbytes(m['peak_memory'])}: {verdict} in "
        f"{nbytes(r['device_memory'])} (closed-form plan: {nbytes(r['planned_bytes_per_device'])})"
    )
    c, rf = r["cost_per_device"], r["roofline"]
    flops = "n/a" if c["flops"] is None else f"{c['flops']:.3e}"
    loops = ", ".join(str(n) for n in r["scanned_loops"]) or "none"
    lines.append(f"  compiled FLOPs {flops} (loops multiplied out; trip counts: {loops}), model "
                 f"FLOPs {r['model_flops_per_device']:.3e} per device")  # fmt: skip
    if c.get("flash_kernel_flops"):
        lines.append(f"  of which {c['flash_kernel_flops']:.3e} in the flash attention kernels "
                     f"({r['pallas_calls']} call sites), counted in closed form (XLA cannot see "
                     "into them)")  # fmt: skip
    for op, v in sorted(r["collectives"].items()):
        lines.append(f"  {op}: {v['count']} per step, {nbytes(v['bytes'])}")
    if rf.get("approximate"):
        lines.append("  (a loop's trip count or the compiled FLOPs could not be read: the roofline "
                     "below undercounts that loop and is not an estimate to plan by)")  # fmt: skip
    lines.append(
        f"  roofline step {1e3 * rf['step_s']:.4g} ms if compute, memory and collectives overlap "
        f"({rf['bound']}-bound; MFU at most {100 * rf['mfu']:.1f}%), {1e3 * rf['serial_s']:.4g}"
        f" ms if they do not (MFU {100 * rf['mfu_serial']:.1f}%)"
    )
    return "\n".join(lines)
