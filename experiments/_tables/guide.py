"""Renderers of the guide pages (docs/scaling.md, docs/reliability.md, docs/evaluation.md), and
the table formatting of the scripts that measured them: memory_plan.py, faults.py and
bench_scan.py print their tables with the functions here, so a script's printout and a page use
one piece of code."""

from __future__ import annotations

from _tables import load, markdown, renderer

GIB, MIB = 2**30, 2**20
KIND_NAMES = {"dense": "dense", "moe-10e": "MoE-10E", "mole-4e": "MoLE-4E"}  # experiments/_kinds.py


def memory_table(all_rows: list[dict]) -> str:
    """memory_plan.py's table: GiB per device of each configuration and its micro-batches."""
    lines = [
        "| model | devices | micro-batches | params | grads | AdamW | activations | total (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in all_rows:
        micro = r["microbatches"] or "does not fit"
        lines.append(
            f"| {r['size']} {r['model']} | {r['devices']} | {micro} | {r['params'] / GIB:.2f} "
            f"| {r['grads'] / GIB:.2f} | {r['opt_state'] / GIB:.2f} "
            f"| {r['activations'] / GIB:.2f} | {r['total'] / GIB:.2f} |"
        )
    return "\n".join(lines)


@renderer("memory_plan")
def memory_plan(name: str = "memory_plan.json") -> str:
    return memory_table(load(name))


def faults_table(out: dict[str, list[dict]], notes: dict[str, str] | None = None) -> str:
    """faults.py's table: per fault kind, faults injected, recovered, artefacts lost and
    tracebacks; `notes` adds a few words after a kind's name."""
    notes = notes or {}
    lines = [
        "| fault | injected | landed | recovered | artefacts lost | tracebacks |",
        "|---|---|---|---|---|---|",
    ]
    for kind, rows in out.items():
        name = f"{kind} ({notes[kind]})" if kind in notes else kind
        landed = [r["landed"] for r in rows if "landed" in r]
        lines.append(
            f"| {name} | {len(rows)} | {sum(landed) if landed else 'not recorded'} "
            f"| {sum(r['recovered'] for r in rows)} "
            f"| {sum(r['lost'] for r in rows)} | {sum(r['tracebacks'] for r in rows)} |"
        )
    return "\n".join(lines)


FAULT_NOTES = {
    "kill_train": "SIGKILL/SIGTERM at a random time, then run again",
    "kill_eval": "`eval --offload` of the MoE",
    "kill_sweep": "the sweep's process group",
    "damage_checkpoint": "bits flipped or truncated, newest step",
    "damage_tokens": "the token cache",
    "damage_config": "`config.json` / `tokenizer.json`",
    "disk_full": "`train` / `export` under a file size limit",
    "invalid_input": "bad configs and command lines",
    "damage_metrics": "`metrics.jsonl` flipped, truncated, non-UTF-8, a block lost",
    "damage_checksums": "`checksums.json` truncated, emptied, not JSON, flipped",
    "missing_shard": "a LUT shard file deleted",
    "diverge": "`train` on at lr 5-10,000",
    "export_damaged": "`export` with the newest checkpoint damaged",
    "read_only": "`train` / `export` / `eval` on a read-only workdir",
    "sigterm_multihost": "SIGTERM to one of two `train` processes",
}


@renderer("faults")
def faults(name: str = "faults.json") -> str:
    """The fault campaign's outcome per kind (experiments/faults.py)."""
    return faults_table(load(name)["faults"], FAULT_NOTES)


def scan_table(rows: list[dict]) -> str:
    """bench_scan.py's table: loop and scan in separate columns, with the final losses."""
    lines = ["| size | kind | layers | compile loop (s) | compile scan (s) | step loop (s) "
             "| step scan (s) | temp loop (MB) | temp scan (MB) | loss loop / scan |",
             "|" + "---|" * 10]  # fmt: skip
    for r in rows:
        lo, sc = r["loop"], r["scan"]
        step = [f"{x['step_s']:.3f}" if "step_s" in x else "-" for x in (lo, sc)]
        loss = f"{lo['final_loss']:.6f} / {sc['final_loss']:.6f}" if "final_loss" in lo else "-"
        mb = [f"{x['temp_bytes'] / MIB:.0f}" for x in (lo, sc)]
        lines.append(f"| {r['size']} | {r['kind']} | {lo['n_layers']} | {lo['compile_s']:.1f} "
                     f"| {sc['compile_s']:.1f} | {step[0]} | {step[1]} | {mb[0]} | {mb[1]} "
                     f"| {loss} |")  # fmt: skip
    return "\n".join(lines)


@renderer("scan_layers")
def scan_layers(*names: str) -> str:
    """Loop / scan pairs of bench_scan.py's rows, from each file named (default: the timed run
    and the compile-only one at paper depths)."""
    rows = [r for n in names or ("bench_scan.json", "bench_scan_compile.json") for r in
            load(n)["rows"]]  # fmt: skip
    header = ["size", "kind", "layers", "compile loop / scan (s)", "step loop / scan (s)",
              "temp loop / scan (MB)"]  # fmt: skip
    cells = []
    for r in rows:
        lo, sc = r["loop"], r["scan"]
        step = f"{lo['step_s']:.3f} / {sc['step_s']:.3f}" if "step_s" in lo else "–"
        cells.append([
            r["size"], KIND_NAMES.get(r["kind"], r["kind"]), lo["n_layers"],
            f"{lo['compile_s']:.1f} / {sc['compile_s']:.1f}", step,
            f"{lo['temp_bytes'] / MIB:,.0f} / {sc['temp_bytes'] / MIB:,.0f}",
        ])  # fmt: skip
    return markdown(header, cells)


REPOS = {".": "this version", "/tmp/old": "previous main"}  # bench_data.py --repos=.,/tmp/old


@renderer("data_prepare")
def data_prepare(name: str = "bench_data.json") -> str:
    """Peak RSS and seconds of `pipeline.prepare` per corpus size, one column per checkout
    (experiments/bench_data.py)."""
    rows = load(name)
    repos = list(dict.fromkeys(r["repo"] for r in rows))
    sizes = list(dict.fromkeys(r["corpus_mb"] for r in rows))
    by = {(r["corpus_mb"], r["repo"]): r for r in rows}
    header = ["corpus"] + [f"{REPOS.get(repo, repo)}: peak RSS, time" for repo in repos]
    cells = [[f"{mb:.0f} MB"] + [_rss(by.get((mb, repo))) for repo in repos] for mb in sizes]
    return markdown(header, cells)


def _rss(r: dict | None) -> str:
    return "–" if r is None else f"{r['peak_rss_mb']:,.0f} MB, {r['seconds']:.1f} s"


@renderer("digest_cost")
def digest_cost(name: str = "bench_digest.json") -> str:
    """Seconds to digest a whole train state: SHA-256 against digest.py (bench_digest.py)."""
    header = ["size", "kind", "train state (MB)", "SHA-256 (s)", "digest.py (s)"]
    cells = [
        [r["size"], KIND_NAMES.get(r["kind"], r["kind"]), f"{r['state_mb']:,.1f}",
         f"{r['sha256_s']:.3f}", f"{r['digest_s']:.3f}"]
        for r in load(name)["rows"]
    ]  # fmt: skip
    return markdown(header, cells)


@renderer("zero_shot_speed")
def zero_shot_speed(name: str = "bench_zero_shot.json") -> str:
    """Seconds per 1,000 lm-eval requests per engine and round, and the bytes each engine read
    per token (experiments/bench_zero_shot.py)."""
    rows = load(name)["rows"]
    rounds = sorted({r["round"] for r in rows})
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    by = {(r["engine"], r["round"]): r for r in rows}
    header = ["engine"] + [f"round {k + 1}: s / 1,000 requests" for k in rounds]
    header.append("bytes read / token")
    cells = []
    for e in engines:
        per = [by.get((e, k)) for k in rounds]
        cells.append(
            [e]
            + [f"{r['seconds_per_1000']:.1f}" if r else "–" for r in per]
            + [f"{next(r for r in per if r)['bytes_read_per_token']:,.0f}"]
        )
    return markdown(header, cells)
