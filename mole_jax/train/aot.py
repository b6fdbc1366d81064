"""`launch.py compile`: a config's real train step compiled ahead of time for a hardware target
(a TPU topology or a GPU cluster, `parallel.targets`) on this host, without the devices.

The step is the one `train` runs (`trainer.setup` on the target's mesh, so every backend choice
reads the target's platform), lowered from abstract inputs at their worst case (MoLE's token
tables at their bound: every position a distinct id, up to the vocabulary). The report, per
device: XLA's memory analysis (arguments, outputs, temporaries, peak) against the device's
memory, its cost analysis (FLOPs, bytes accessed), the collectives of the optimised HLO, host
seconds and RAM of the compile, and a roofline estimate of the step time:

    time  = max(FLOPs / peak FLOP/s, bytes accessed / HBM bandwidth, collective bytes / link)
    MFU   = model FLOPs (accounting's 6N + attention, per token x tokens) / (time x peak FLOP/s)

XLA counts a while loop's body once (a scanned layer stack, a micro-batch loop); `train.hlo`
multiplies every body by its trip count (read off the program: `scanned_loops`), for the FLOPs,
the bytes accessed and the collectives alike, so the roofline is that of the whole step. Its
FLOPs are the compiled program's (remat's recomputation included), its MFU counts only the
model's. A program that does not fit a TPU's memory is refused by the compiler itself
(RESOURCE_EXHAUSTED); the report then carries what it needed.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import resource
import time

import jax
import jax.numpy as jnp

from mole_jax.errors import ConfigError
from mole_jax.model.config import model_config
from mole_jax.parallel import targets
from mole_jax.parallel.sharding import BATCH_AXES
from mole_jax.train import accounting, hlo
from mole_jax.train.trainer import Trainer, setup

MEMORY = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
          "temp_size_in_bytes", "peak_memory_in_bytes")  # fmt: skip
_OOM = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT])\).*?available HBM \(([\d.]+)")


def abstract_inputs(tr: Trainer) -> tuple:
    """(state, batch, dedup) of the train step as sharded ShapeDtypeStructs; MoLE's token
    tables at their largest: min(vocabulary, the tokens of a group) ids per group."""
    cfg, t = tr.cfg, tr.cfg.train
    shape = (t.microbatches, t.batch_size // t.microbatches, cfg.data.seq_len + 1)
    batch = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=tr.batch_sharding)
    dedup = None
    if tr.table_layers:
        groups = tr.local_groups
        per_micro = t.token_tables == "microbatch"
        tokens = (shape[1] if per_micro else t.batch_size) * cfg.data.seq_len // groups
        rows = min(cfg.model.vocab_size, tokens)
        lead = (t.microbatches,) if per_micro else ()
        names = ((None,) if per_micro else ()) + ("batch", None)
        from jax.sharding import NamedSharding

        from mole_jax.parallel.sharding import logical_spec

        sharding = NamedSharding(tr.mesh, logical_spec(names, tr.mesh))
        uniq = jax.ShapeDtypeStruct((*lead, groups, rows), jnp.int32, sharding=sharding)
        inv = jax.ShapeDtypeStruct(shape[:2] + (shape[2] - 1,), jnp.int32,
                                   sharding=tr.batch_sharding)  # fmt: skip
        dedup = (uniq, inv)
    return tr.abstract_state, batch, dedup


def compile_step(cfg, target: targets.Target) -> dict:
    """Compiles `cfg`'s train step for `target`; returns the report (see the module doc)."""
    t0 = time.perf_counter()
    malloc = lean_malloc()
    # JAX's persistent cache writes a deviceless executable but cannot read one back (jax 0.10:
    # "PjRtCompiler must be constructed with a Client"): off, rather than warn and write in vain
    jax.config.update("jax_enable_compilation_cache", False)
    devs = targets.devices(target)
    mesh = targets.mesh(target, devs, cfg.mesh)
    tr = setup(cfg, mesh)
    args = abstract_inputs(tr)
    report = _header(cfg, target, devs, mesh)
    t1 = time.perf_counter()
    lowered = tr.step_fn.lower(*args)
    # the target's code paths, read off the program: MoE's grouped matmul as ragged_dot, the
    # flash attention kernels as Pallas calls
    text = lowered.as_text()
    report["ragged_dot_ops"] = text.count("ragged_dot")
    report["pallas_calls"] = text.count("tpu_custom_call") + text.count("__gpu$xla.gpu.triton")
    t2 = time.perf_counter()
    rss = {"lowered": _rss_gib()}
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA raises its own runtime error type
        return {**report, **_refused(e, target), "seconds": _seconds(t0, t1, t2)}
    rss["compiled"] = _rss_gib()
    prog = hlo.parse(compiled.as_text())
    ma = compiled.memory_analysis()
    memory = {k.removesuffix("_in_bytes"): int(getattr(ma, k)) for k in MEMORY}
    report.update(
        compiled=True,
        memory_per_device=memory,
        fits=memory["peak_memory"] <= target.peak.memory,
        cost_per_device=_with_kernels(hlo.cost(compiled, prog), cfg, mesh, target.platform),
        collectives=hlo.collectives(prog),
        scanned_loops=[lp.trips for lp in hlo.all_loops(prog)],
        seconds=_seconds(t0, t1, t2),
        # the process's peak RAM when the compiler returned (the compile's cost), and after
        # this report's own analysis of the program (loop bodies re-analysed on the host)
        host_peak_rss_gib=rss["compiled"],
        host_rss_gib={**rss, "analysed": _rss_gib()},
        host_malloc=malloc,
    )
    report["roofline"] = roofline(report, target)
    return report


def _header(cfg, target: targets.Target, devs, mesh) -> dict:
    s = accounting.summarize(cfg, len(devs), target.platform)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    return {
        "topology": target.name,
        "num_slices": target.num_slices,
        "platform": target.platform,
        "device_kind": devs[0].device_kind,
        "devices": len(devs),
        "hosts": len({d.process_index for d in devs}),
        "mesh": dict(mesh.shape),
        "batch": [cfg.train.batch_size, cfg.data.seq_len],
        "microbatches": cfg.train.microbatches,
        "scan_layers": bool(cfg.model.scan_layers),
        "remat": cfg.model.remat,
        "params_total": s["params_total"],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "device_memory": target.peak.memory,
        "planned_bytes_per_device": s["bytes_per_device"]["total"],
        "model_flops_per_device": s["train_flops_per_token"] * tokens / len(devs),
    }


def flash_flops(cfg, mesh, platform: str) -> float:
    """FLOPs per device per step of the flash attention kernels, which XLA's cost analysis does
    not see into (a custom call): per layer and head, causal, forward 2 x T S K (q.k and p.v
    over the half of the blocks at or below the diagonal, T the device's positions), backward
    2.5 x that (q.k again, dP, dV, dQ, dK), the forward twice under remat; 0 where the step
    uses XLA's attention."""
    from mole_jax.model import flash
    from mole_jax.model.ffn.pregated import router_config

    m, s = model_config(cfg), cfg.data.seq_len
    if flash.resolve(m.attention, s, platform) != "flash":
        return 0.0
    ways = math.prod(mesh.shape[a] for a in BATCH_AXES)
    tokens = cfg.train.batch_size * s / ways
    forwards = 1 if m.remat == "none" else 2
    blocks = [(m.n_layers, m.n_heads, m.head_dim)]
    if m.kind == "pregated":
        r = router_config(m)
        blocks.append((1, r.n_heads, r.head_dim))
    per_head = 2 * tokens * s * (forwards + 2.5)
    return sum(n * h / mesh.shape["tensor"] * k * per_head for n, h, k in blocks)


def _with_kernels(cost: dict, cfg, mesh, platform: str) -> dict:
    kernels = flash_flops(cfg, mesh, platform)
    if not kernels or cost["flops"] is None:
        return cost
    return {**cost, "flops": cost["flops"] + kernels, "flash_kernel_flops": kernels}


# glibc malloc for the compiler's threads: two arenas (not 8 per core), blocks over 64 KiB
# mmapped and every free returned at once. The compiled program is the same; the host's peak
# RAM of the paper configurations' compiles 8-13 % lower for v5p:4x4x4 (1b pre-gated: 4.90 ->
# 4.47 GiB), 0-4 % for H100, every memory analysis unchanged (docs/scaling.md, compile cost).
MALLOC = {"arena_max": (-8, 2), "mmap_threshold": (-3, 65536), "trim_threshold": (-1, 0)}


def lean_malloc() -> dict:
    """Sets `MALLOC` with mallopt (glibc; elsewhere nothing) before the compiler starts."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return {}
    return {name: v for name, (param, v) in MALLOC.items() if libc.mallopt(param, v) == 1}


def _rss_gib() -> float:
    """The process's peak resident memory so far, GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _seconds(t0: float, t1: float, t2: float) -> dict:
    now = time.perf_counter()
    return {"setup": round(t1 - t0, 2), "lower": round(t2 - t1, 2), "compile": round(now - t2, 2)}


def _refused(e: Exception, target: targets.Target) -> dict:
    """A compile the target's compiler refused: out of memory (with what it needed), else the
    error's first line as a ConfigError."""
    text = str(e)
    m = _OOM.search(text)
    if "RESOURCE_EXHAUSTED" not in text or m is None:
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise ConfigError(f"--topology={target.name}: the compiler refused the step: {first}")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2)]
    return {
        "compiled": False,
        "fits": False,
        "needed_temporaries": int(float(m.group(1)) * scale),
        "error": text.strip().splitlines()[0][:300],
    }


def roofline(report: dict, target: targets.Target) -> dict:
    """Step-time bounds per device from the compiled program (loops multiplied out) and the
    device's peaks: `step_s` if compute, memory traffic and collectives overlap fully (a lower
    bound on the time, so its MFU is an upper bound), `serial_s` if none overlap (the other
    end). MFU = model FLOPs / (time x peak): remat's recomputation counts as time, not as work.
    Without the compiled FLOPs (a jax without the cost binding) the model's stand in, flagged
    `approximate`, as is a program with a loop whose trip count was not read."""
    peak, cost = target.peak, report["cost_per_device"]
    model = report["model_flops_per_device"]
    flops = cost["flops"] or model
    comm = sum(c["bytes"] for c in report["collectives"].values())
    times = {"compute_s": flops / peak.flops, "collectives_s": comm / peak.link_bytes_s}
    if cost["bytes_accessed"]:
        times["memory_s"] = cost["bytes_accessed"] / peak.hbm_bytes_s
    step, serial = max(times.values()), sum(times.values())
    return {
        **{k: float(f"{v:.4g}") for k, v in times.items()},
        "step_s": float(f"{step:.4g}"),
        "serial_s": float(f"{serial:.4g}"),
        "bound": max(times, key=times.get).removesuffix("_s"),
        "mfu": round(model / (step * peak.flops), 3),
        "mfu_serial": round(model / (serial * peak.flops), 3),
        "compiled_over_model_flops": round(flops / model, 3),
        "approximate": not cost["flops"] or None in report["scanned_loops"],
        "assumes": peak.source,
    }
