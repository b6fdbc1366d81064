"""Tables of the benchmarks (docs/benchmarks.md): training throughput, offloaded inference,
prefetch recall, the MoE-offloading ablation, expert-cache policies, pre-gated serving (one
queue; several, with verdicts), stores in object storage, conversion against pruning, each from
the JSON its script wrote under experiments/results/.

The formatting functions a benchmark prints with live here too (`train_table`, `cache_table`,
`offload_markdown`, `convert_table`), imported by the scripts, so that the script's output and the
page's table are the same code. Nothing here imports a benchmark script: those define absl flags
at import time."""

from __future__ import annotations

from _tables import load, markdown, renderer

CACHES = ("random", "lru", "belady")  # mole_jax.infer.offload.policies.POLICIES, in its order
BATCHINGS = ("decode_first", "prefill_first", "expert_aware")  # ...offload.serving.POLICIES


# --- training throughput (bench_train.py) ---------------------------------------------------


def train_table(rows: list[dict], ref: dict | None = None) -> str:
    """bench_train's table; `ref` (the dense row) gives the last column."""
    head = (
        "| config | active params | tokens/step | step (s) | tokens/s | MFU "
        "| XLA GFLOP/token | step vs dense |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        ratio = f"{r['step_time_s'] / ref['step_time_s']:.2f}x" if ref else "-"
        lines.append(
            f"| {r.get('name', r['kind'])} | {r['params_active_per_token'] / 1e6:.2f} M "
            f"| {r['tokens_per_step']} | {r['step_time_s']:.3f} | {r['tokens_per_s']:.0f} "
            f"| {100 * r['mfu']:.1f}% | {r['xla_flops_per_token'] / 1e9:.4f} | {ratio} |"
        )
    return "\n".join(lines)


@renderer("bench_train")
def bench_train(path: str) -> str:
    """`bench_train.py --compare=... --json=PATH`: every row against the first (dense)."""
    rows = load(path)["rows"]
    return train_table(rows, rows[0])


# --- offloaded inference (bench_offload.py) -------------------------------------------------


def offload_markdown(results: list[dict], meta: dict) -> str:
    """bench_offload's table and the line under it (also written to bench_offload.md)."""
    head = (
        "| model | batch | decode ms median | p95 | prefill ms | bytes/token read (decode) | "
        "measured I/O bytes/token (decode) | bytes/token read (prefill) | resident MiB | "
        "val loss |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['model']} | {r['batch']} | {r['decode_ms_median']:.2f} | {r['decode_ms_p95']:.2f} "
        f"| {r['prefill_s'] * 1e3:.1f} | {r['bytes_per_token']:,.0f} "
        f"| {r['io_bytes_per_token']:,.0f} | {r['prefill_bytes_per_token']:,.0f} "
        f"| {r['resident_bytes'] / 2**20:.1f} | {r['val_loss']:.4f} |\n"
        for r in results
    )
    note = (
        f"\nsize={meta['size']}, prompt {meta['prompt']} tokens, {meta['new']} new tokens, "
        f"{meta['rounds']} lockstep rounds, "
        f"page cache {meta['page_cache']}, {meta['machine']}.\n"
    )
    return head + body + note


@renderer("bench_offload")
def bench_offload(path: str) -> str:
    d = load(path)
    return offload_markdown(d["results"], d["meta"])


# --- speculative prefetch (bench_prefetch.py) -----------------------------------------------


@renderer("bench_prefetch")
def bench_prefetch(path: str) -> str:
    rows = []
    for r in load(path)["rows"]:
        if r["prefetch"]:
            ahead = r["lookahead"]
            name = f"best {r['prefetch_k']}, {ahead} layer{'s' if ahead > 1 else ''} ahead"
            guess = f"{r['prefetch_recall']:.3f}"
        else:
            name, guess = "off", "-"
        rows.append(
            [name, f"{r['expert_recall']:.3f}", guess, f"{r['hit_rate']:.3f}"]
            + [f"{r['reads_per_token']:.2f}"]
        )
    head = ["prefetch", "expert recall (cached or on its way)", "guess recall", "LRU hit rate"]
    return markdown(head + ["experts read / token"], rows)


# --- the MoE-offloading ablation (bench_offload_ablation.py) --------------------------------


@renderer("bench_offload_ablation")
def bench_offload_ablation(path: str) -> str:
    """The first width's engines by their full names, the other widths' by the short ones."""
    d = load(path)
    first = d["rows"][0]["dtype"]
    rows = []
    for r in d["rows"]:
        name = r["engine"]
        if "(reference)" not in name:
            if r["dtype"] != first:
                name = name.split(" (")[0]
            elif name == "+ LRU + prefetch":
                name += " (full system)"
        rows.append(
            [r["dtype"], name, f"{r['tokens_per_s']:.1f}", f"{r['bytes_per_token']:,.0f}"]
            + [f"{r['val_loss']:.4f}"]
        )
    n = d["meta"]["eval_batches"]
    return markdown(
        ["width", "engine", "tokens/s", "bytes read / token", f"val loss ({n} batches)"], rows
    )


# --- expert-cache policies (bench_cache.py) -------------------------------------------------


def cache_table(rows: list[dict], n_experts: int) -> str:
    """bench_cache's table: hit ratio and expert loads per token of each policy."""
    head = (
        "| batch | capacity / layer | Random | LRU | Belady | expert loads per token "
        "(Random / LRU / Belady) |"
    )
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        loads = " / ".join(f"{r[f'{p}_loads_per_token']:.2f}" for p in CACHES)
        lines.append(
            f"| {r['batch']} | {r['capacity']} of {n_experts} "
            f"| {100 * r['random']:.1f}% | {100 * r['lru']:.1f}% | {100 * r['belady']:.1f}% "
            f"| {loads} |"
        )
    return "\n".join(lines)


@renderer("bench_cache")
def bench_cache(path: str) -> str:
    d = load(path)
    return cache_table(d["rows"], d["experts"])


# --- serving a pre-gated queue (bench_serving.py) -------------------------------------------


def _modelled_rows(modelled: list[dict]) -> list[list[str]]:
    """One row per offered load: mean / p95 ms per token (unique experts per batch) of each
    batching, "the same" where a batching equals FIFO; consecutive loads at which every batching
    equals FIFO share one row."""
    by = {(r["load"], r["batching"]): r for r in modelled}
    groups: list[tuple[bool, list]] = []  # (every batching equals FIFO, [(load, lat, uniq)])
    for load_ in dict.fromkeys(r["load"] for r in modelled):
        cells = [by[(load_, b)] for b in BATCHINGS]
        lat = [f"{r['mean_ms']:.1f} / {r['p95_ms']:.1f}" for r in cells]
        uniq = [f"{r['unique_experts']:.2f}" for r in cells]
        same = len(set(zip(lat, uniq, strict=True))) == 1
        if same and groups and groups[-1][0]:
            groups[-1][1].append((load_, lat, uniq))
        else:
            groups.append((same, [(load_, lat, uniq)]))
    rows = []
    for _, items in groups:
        loads = ", ".join(load_ for load_, _, _ in items)
        fifo = ", ".join(lat[0] for _, lat, _ in items)
        fifo += f" ({', '.join(uniq[0] for _, _, uniq in items)})"
        _, lat, uniq = items[0]  # a group of several loads is one where every batching is FIFO
        others = [
            "the same" if (a, u) == (lat[0], uniq[0]) else f"{a} ({u})"
            for a, u in zip(lat[1:], uniq[1:], strict=True)
        ]
        rows.append([f"{loads} (modelled)", fifo, *others])
    return rows


def _executed_rows(executed: list[dict]) -> list[list[str]]:
    """One row per executed load: mean / p95 ms per token with Belady; with LRU."""
    by = {(r["load"], r["batching"], r["eviction"]): r for r in executed}
    rows = []
    for load_ in dict.fromkeys(r["load"] for r in executed):
        cells = []
        for b in BATCHINGS:
            bel, lru = by[(load_, b, "belady")], by[(load_, b, "lru")]
            cells.append(
                f"{bel['mean_ms']:.1f} / {bel['p95_ms']:.1f}; "
                f"{lru['mean_ms']:.1f} / {lru['p95_ms']:.1f}"
            )
        rows.append([f"{load_} (executed, Belady; LRU)", *cells])
    return rows


@renderer("serving_latency")
def serving_latency(path: str) -> str:
    """Latency per token of each batching at each offered load, modelled and executed."""
    d = load(path)
    rows = _modelled_rows(d["modelled"]) + _executed_rows(d["executed"])
    head = ["load", "decode-first (FIFO)", "prefill-first", "expert-aware (Algorithm 1)"]
    return markdown(head, rows)


@renderer("serving_hits")
def serving_hits(*queues: str) -> str:
    """Hit ratio of a shared cache on each queue's time-0 FIFO batches; args LABEL=FILE."""
    runs = [(label, load(path)) for label, path in (q.split("=", 1) for q in queues)]
    head = ["capacity / layer"]
    for label, _ in runs:
        head += [f"{label}: Random", "LRU", "Belady (offline)"]
    fifo = [next(r for r in d["rows"] if r["batching"] == "decode_first") for _, d in runs]
    caps = runs[0][1]["flags"]["capacity"]
    rows = [
        [cap] + [f"{100 * r[f'hit_{c}_{cap}']:.1f} %" for r in fifo for c in CACHES] for cap in caps
    ]
    return markdown(head, rows)


@renderer("serving_costs")
def serving_costs(*paths: str) -> str:
    """The cost model's constants each run measured: one expert's read from the dropped store,
    and compute(n, k) at the largest n (the budget) for k = 1 .. experts."""
    runs = [(path, load(path)) for path in paths]
    n = max((m for _, d in runs for m in d["compute_s"]), key=int)
    width = max(len(d["compute_s"][n]) for _, d in runs)
    head = ["JSON", "workdir", "read one expert (ms)", f"compute({n}, k) ms: k = 1"]
    head += [str(k) for k in range(2, width + 1)]
    rows = []
    for path, d in runs:
        ks = [f"{1e3 * s:.2f}" for s in d["compute_s"][n].values()]
        row = [path, d["flags"]["workdir"], f"{1e3 * d['load_s']:.2f}", *ks]
        rows.append(row + [""] * (len(head) - len(row)))
    return markdown(head, rows)


@renderer("serving_seeds")
def serving_seeds(path: str) -> str:
    """serving_seeds.py: FIFO and expert-aware per cost model and load, mean over the queues
    (unique experts per batch; mean / p95 ms per token), then the declared claims' verdicts and
    the exploratory ones, each tested anew on the rows (`_serving_claims.py`)."""
    from _serving_claims import CLAIMS, EXPLORATORY, tests, verdict_line

    d = load(path)
    rows = d["modelled"]
    cells = {}
    for r in rows:
        cells.setdefault((r["cost"], r["load"], r["batching"]), []).append(r)
    head = ["cost model", "load", "FIFO: experts / batch", "mean / p95 ms", "expert-aware: "
            "experts / batch", "mean / p95 ms"]  # fmt: skip
    table = []
    for cost, load_ in dict.fromkeys((c, lo) for c, lo, _ in cells):
        line = [cost, load_]
        for b in ("decode_first", "expert_aware"):
            rs = cells[(cost, load_, b)]
            mean = {k: sum(r[k] for r in rs) / len(rs) for k in ("unique_experts", "mean_ms",
                                                                 "p95_ms")}  # fmt: skip
            line += [
                f"{mean['unique_experts']:.2f}",
                f"{mean['mean_ms']:.1f} / {mean['p95_ms']:.1f}",
            ]
        table.append(line)
    out = [markdown(head, table), "", "Declared before the runs:", ""]
    out += [f"- {verdict_line(t)}" for t in tests(rows, CLAIMS)]
    out += ["", "Exploratory (not declared; the engine's padded cost model):", ""]
    out += [f"- {verdict_line(t)}" for t in tests(rows, EXPLORATORY)]
    return "\n".join(out)


@renderer("serving_seeds_summary")
def serving_seeds_summary(path: str) -> str:
    """serving_seeds.py's declared claims counted by verdict, in one line."""
    from _serving_claims import CLAIMS, tests, verdict_line

    lines = [verdict_line(t) for t in tests(load(path)["modelled"], CLAIMS)]
    words = ("reproduced", "contradicted", "not resolved at this scale")
    counts = {w: sum(f": {w} —" in v for v in lines) for w in words}
    return (f"{len(lines)} declared claims: " + ", ".join(f"{n} {w}" for w, n in counts.items())
            + " (paired over six queues, Holm)")  # fmt: skip


# --- stores in object storage (bench_remote.py) --------------------------------------------


def remote_table(rows: list[dict]) -> str:
    """bench_remote's table: per model and store, each batch's median / p95 ms per decode step,
    requests and bytes per token; then the target check of every delayed HTTP store."""
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    head = ["model", "store"]
    for b in batches:
        head += [f"batch {b}: ms / step (p95)", "requests / token", "bytes / token"]
    by = {(r["model"], r["store"], r["batch"]): r for r in rows}
    table = []
    for model, store in dict.fromkeys((r["model"], r["store"]) for r in rows):
        line = [model, store]
        for b in batches:
            r = by[(model, store, b)]
            line += [f"{r['step_ms']:.2f} ({r['p95_ms']:.2f})", f"{r['requests_per_token']:.2f}",
                     f"{r['bytes_per_token']:,.0f}"]  # fmt: skip
        table.append(line)
    out = [markdown(head, table), ""]
    for b in batches:
        mem = by[("MoLE-4E LUT in memory", "memory", b)]["step_ms"]
        for (model, store, bb), r in by.items():
            if bb != b or model != "MoLE-4E offloaded" or store == "folder":
                continue
            rtt = r["round_trip_ms"]
            bound = 1.3 * (rtt + mem)
            verdict = "meets" if r["step_ms"] <= bound else "misses"
            out.append(f"- batch {b}, {store}: MoLE {r['step_ms']:.2f} ms per step; target "
                       f"1.3 x (round trip {rtt:.2f} + in memory {mem:.2f}) = {bound:.2f} ms: "
                       f"{verdict} it")  # fmt: skip
    return "\n".join(out)


@renderer("remote")
def remote(path: str) -> str:
    return remote_table(load(path)["rows"])


@renderer("remote_summary")
def remote_summary(path: str, batch: str = "1") -> str:
    """One row per store at one batch: its round trip, then ms per decode step and requests per
    token of MoLE (cold) and of the MoE (LRU; cold)."""
    rows = [r for r in load(path)["rows"] if r["batch"] == int(batch)]
    by = {(r["model"], r["store"]): r for r in rows}
    lru = next(r["model"] for r in rows if r["model"].startswith("MoE-10E offloaded, LRU"))
    head = ["store", "round trip (ms)", "MoLE-4E: ms / token", "requests / token",
            "MoE-10E LRU: ms / token", "requests / token", "MoE-10E cold: ms / token",
            "requests / token"]  # fmt: skip
    table = []
    for store in dict.fromkeys(r["store"] for r in rows if r["store"] != "memory"):
        line = [store, f"{by[('MoLE-4E offloaded', store)]['round_trip_ms']:.2f}"]
        for model in ("MoLE-4E offloaded", lru, "MoE-10E offloaded, no cache"):
            r = by[(model, store)]
            line += [f"{r['step_ms']:.2f}", f"{r['requests_per_token']:.2f}"]
        table.append(line)
    return markdown(head, table)


# --- conversion against pruning (convert_vs_pruned.py) --------------------------------------


def convert_table(rows: list[dict], labels: dict[str, str] | None = None) -> str:
    """convert_vs_pruned's table: loss per domain of each model (`labels` renames the rows)."""
    domains = [k for k in rows[0] if k not in ("model", "workdir")]
    lines = ["| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for row in rows:
        name = (labels or {}).get(row["model"], row["model"])
        lines.append(f"| {name} | " + " | ".join(f"{row[d]:.4f}" for d in domains) + " |")
    return "\n".join(lines)


@renderer("convert_vs_pruned")
def convert_vs_pruned(path: str, d_ff: str) -> str:
    """The rows named by the channels active, given the dense source's FFN width `d_ff`."""
    full, half = int(d_ff), int(d_ff) // 2
    labels = {
        "dense (source)": f"dense source ({full:,} channels active)",
        "converted: 3 experts + permanent": (
            f"converted: 3 domain experts + permanent ({half:,} active)"
        ),
        "pruned: same active width": f"pruned to {half:,} channels, same updates",
    }
    return convert_table(load(path)["rows"], labels)
