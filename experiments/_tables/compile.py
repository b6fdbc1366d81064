"""Tables of the compiled programs (docs/scaling.md): experiments/compile_plan.py's rows, each a
paper configuration compiled for a target with the fewest micro-batches that fit."""

from __future__ import annotations

from _tables import RESULTS, load, markdown, renderer

GIB = 2**30


def _gib(v) -> str:
    return "-" if v is None else f"{v / GIB:.2f}"


def _row(r: dict) -> list[str]:
    m = r.get("memory_per_device") or {}
    peak = m.get("peak_memory")
    plan = r.get("planned_bytes_per_device")
    err = "-" if not (peak and plan) else f"{100 * (plan / peak - 1):+.0f}%"
    rf = r.get("roofline") or {}
    micro = r["attempts"][-1]["microbatches"] if r.get("attempts") else "-"
    return [
        r["name"], r["topology"], str(micro) if r.get("fits") else f"none up to {micro}",
        _gib(peak), _gib(r.get("device_memory")), "yes" if r.get("fits") else "no", _gib(plan),
        err, f"{r['seconds']['compile']:.0f}" if r.get("seconds") else "-",
        f"{r['host_peak_rss_gib']:.1f}" if r.get("host_peak_rss_gib") else "-",
        f"{rf['step_s']:.3g} – {rf['serial_s']:.3g}" if rf else "-",
        f"{100 * rf['mfu_serial']:.0f}% – {100 * rf['mfu']:.0f}%" if rf else "-",
    ]  # fmt: skip


@renderer("compile_plan")
def compile_plan(path: str = "compile_plan.json") -> str:
    if not (RESULTS / path).exists():
        return "(no compiled rows yet: `python experiments/compile_plan.py`)"
    rows = sorted(load(path)["rows"], key=lambda r: (r["topology"], r["name"]))
    header = ["model", "target", "micro-batches", "peak GiB/device", "device GiB", "fits",
              "plan GiB", "plan vs peak", "compile s", "host RSS GiB",
              "roofline step s (overlapped – serial)",
              "est. MFU (serial – overlapped)"]  # fmt: skip
    return markdown(header, [_row(r) for r in rows])
