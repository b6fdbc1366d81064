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


def _rows(path: str) -> dict[tuple[str, str], dict]:
    return {(r["name"], r["topology"]): r for r in load(path)["rows"]}


def _fit_cell(r: dict | None) -> str:
    if r is None:
        return "-"
    micro = r["attempts"][-1]["microbatches"]
    if not r.get("fits"):
        return f"no fit at {micro} micro"
    more = f" ({micro} micro)" if micro > 1 else ""
    return f"{r['memory_per_device']['peak_memory'] / GIB:.1f}{more}"


@renderer("compile_fit_summary")
def compile_fit_summary(path: str = "compile_plan.json") -> str:
    """README: per paper configuration, the compiled peak GiB per device at the paper batch on
    each target (one micro-batch unless said)."""
    if not (RESULTS / path).exists():
        return "(no compiled rows yet: `python experiments/compile_plan.py`)"
    rows = _rows(path)
    short = {"h100:1x8x8": "64 H100", "v5p:4x4x4": "v5p:4x4x4"}
    sizes = ("160m", "410m", "1b")
    kinds = dict.fromkeys(n.split("-", 1)[1] for n, _ in sorted(rows))
    targets = sorted({t for _, t in rows})
    header = ["kind", *(f"{s} {short.get(t, t)}" for s in sizes for t in targets)]
    body = [[k, *(_fit_cell(rows.get((f"{s}-{k}", t))) for s in sizes for t in targets)]
            for k in kinds]  # fmt: skip
    return markdown(header, body)


MFU_TARGETS = ("1b-dense", "160m-mole-16e")  # issue 26: >= 50 % estimated MFU on both targets


@renderer("mfu_targets")
def mfu_targets(path: str = "compile_plan.json") -> str:
    """The roofline's estimated MFU of the configurations with a stated target, per target."""
    if not (RESULTS / path).exists():
        return "(no compiled rows yet: `python experiments/compile_plan.py`)"
    out = []
    for (name, topology), r in sorted(_rows(path).items()):
        rf = r.get("roofline")
        if name not in MFU_TARGETS or not rf:
            continue
        out.append([name, topology, f"{rf['compute_s']:.3g}", f"{rf.get('memory_s', 0):.3g}",
                    f"{rf['collectives_s']:.3g}", rf["bound"],
                    f"{rf['compiled_over_model_flops']:.2f}",
                    f"{100 * rf['mfu']:.0f}%", f"{100 * rf['mfu_serial']:.0f}%",
                    "met" if rf["mfu"] >= 0.5 else "not met"])  # fmt: skip
    header = ["model", "target", "compute s", "memory s", "collectives s", "bound",
              "compiled / model FLOPs", "MFU overlapped", "MFU serial",
              "≥ 50 % (overlapped)"]  # fmt: skip
    return markdown(header, out)


@renderer("roofline_peaks")
def roofline_peaks() -> str:
    """The device figures the roofline assumes (`mole_jax.parallel.targets.PEAKS`)."""
    from mole_jax.parallel.targets import PEAKS

    rows = [[name, f"{p.flops / 1e12:,.0f}", f"{p.hbm_bytes_s / 1e9:,.0f}",
             f"{p.link_bytes_s / 1e9:,.0f}", _gib(p.memory), p.source]
            for name, p in PEAKS.items()]  # fmt: skip
    header = ["device", "bf16 TFLOP/s", "HBM GB/s", "link GB/s per device (one way)",
              "memory GiB", "source"]  # fmt: skip
    return markdown(header, rows)


def _pct(span: list[float]) -> str:
    return f"{100 * span[0]:+.0f}% to {100 * span[1]:+.0f}%"


@renderer("plan_calibration")
def plan_calibration(path: str = "plan_calibration.json") -> str:
    """Per platform and FFN kind, the activation factor `compile_plan.py --replan` fitted and the
    plan's error range against the compiled peaks before and after it (in-sample)."""
    if not (RESULTS / path).exists():
        return "(no calibration yet: `python experiments/compile_plan.py --replan`)"
    out = []
    for platform, fit in load(path).items():
        for kind, n in fit["configurations"].items():
            out.append([platform, kind, str(n), f"{fit['activation_factors'][kind]:.3f}",
                        _pct(fit["error_calibrated_by_kind"][kind])])  # fmt: skip
        out.append([platform, "all kinds", str(sum(fit["configurations"].values())),
                    f"{fit['activation_factors']['all']:.3f}",
                    f"{_pct(fit['error_calibrated'])} (one factor: "
                    f"{_pct(fit['error_one_factor'])}; closed form: "
                    f"{_pct(fit['error_closed_form'])})"])  # fmt: skip
    header = ["platform", "kind", "compiled configurations", "activation factor",
              "plan vs compiled peak, calibrated"]  # fmt: skip
    return markdown(header, out)


@renderer("compile_cost")
def compile_cost(path: str = "compile_plan.json") -> str:
    """Per target: the compile's seconds and host RAM over every row, and the rows past the
    issue's budget (10 minutes, 4 GB)."""
    if not (RESULTS / path).exists():
        return "(no compiled rows yet: `python experiments/compile_plan.py`)"
    out, every = [], sorted(_rows(path).items())
    for topology in sorted({t for (_, t), _ in every}):
        rows = [r for (_, t), r in every if t == topology and r.get("seconds")]
        secs = [r["seconds"]["compile"] for r in rows]
        rss = [r["host_peak_rss_gib"] for r in rows]
        over = [f"{r['name']} {r['host_peak_rss_gib'] * GIB / 1e9:.2f} GB" for r in rows
                if r["seconds"]["compile"] > 600 or r["host_peak_rss_gib"] * GIB > 4e9]  # fmt: skip
        out.append(f"- {topology}: {len(rows)} programs, compile {min(secs):.0f}–{max(secs):.0f} "
                   f"s, host RSS {min(rss):.2f}–{max(rss):.2f} GiB; past 10 min or 4 GB: "
                   f"{', '.join(over) or 'none'}")  # fmt: skip
    return "\n".join(out)
