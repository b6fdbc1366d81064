"""The eight released MoLE checkpoints, imported and scored beside MoLE's Table 3.

    python experiments/released.py --dry_run                 # the plan; nothing downloaded
    python experiments/released.py --allow_hub [--limit=N]   # import, export, score (network)
    python experiments/released.py --fixtures                # the pipeline on the test fixtures

Each model (JieShibo/<name> on the Hugging Face hub) is imported with `launch.py import`'s
code, its routed experts exported (MoLE: an fp16 LUT; MoE: an fp16 expert store), and scored on
the paper's zero-shot tasks through lm-evaluation-harness in memory and offloaded, beside the
paper's published accuracy. The released MoE files hard-code top-10 routing, the paper trained
top-2 (`docs/models.md`): a MoE is scored both ways. `--fixtures` runs the same
pipeline on tests/fixtures/hf/mole-* with the offline task pack (no hub), to show it runs.
Writes experiments/results/interop/released[_fixtures].json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


RESULTS = ROOT / "experiments" / "results" / "interop"
TASKS = (
    "arc_challenge",
    "arc_easy",
    "boolq",
    "hellaswag",
    "piqa",
    "race",
    "siqa",
    "lambada_openai",
)
# MoLE Table 3 (accuracy %, in TASKS' order), for the released models only.
PUBLISHED = {
    "Dense-160M": (20.3, 45.9, 57.1, 29.7, 64.0, 29.4, 37.8, 26.2),
    "MoE-160M-10E": (21.7, 49.5, 51.6, 32.0, 66.8, 30.6, 39.1, 31.0),
    "MoLE-160M-4E": (21.9, 48.5, 60.7, 31.2, 65.1, 29.4, 38.4, 31.1),
    "MoE-160M-34E": (20.5, 50.0, 57.5, 34.5, 67.3, 28.6, 39.9, 36.4),
    "MoLE-160M-16E": (22.4, 48.6, 60.3, 32.7, 68.3, 30.9, 38.6, 33.3),
    "Dense-410M": (21.8, 50.8, 56.8, 33.8, 66.5, 29.6, 39.2, 36.2),
    "MoE-410M-10E": (24.1, 53.5, 54.5, 37.1, 69.0, 30.8, 40.8, 41.5),
    "MoLE-410M-4E": (22.0, 54.8, 61.1, 35.9, 69.6, 30.9, 40.1, 42.2),
}
# parameters in training, billions (MoLE Table 2)
PARAMS_B = {
    "Dense-160M": 0.16,
    "MoE-160M-10E": 0.39,
    "MoLE-160M-4E": 0.39,
    "MoE-160M-34E": 1.07,
    "MoLE-160M-16E": 1.07,
    "Dense-410M": 0.41,
    "MoE-410M-10E": 1.21,
    "MoLE-410M-4E": 1.21,
}
FIXTURES = {"mole-dense": "dense", "mole-moe": "moe", "mole-mole": "mole"}
PAPER_TOPK = 2  # what the paper trained its MoE with; the released modeling_moe.py uses 10


def kind_of(name: str) -> str:
    return name.split("-")[0].lower()


def modes_of(kind: str) -> list[str]:
    return ["experts"] + {"mole": ["offload"], "moe": ["moe_offload"]}.get(kind, [])


def plan_rows() -> list[dict]:
    """What a full run imports and scores."""
    return [
        dict(
            model=name,
            repo=f"JieShibo/{name}",
            kind=kind_of(name),
            params_b=PARAMS_B[name],
            modes=modes_of(kind_of(name)),
            published=dict(zip(TASKS, published, strict=True)),
        )
        for name, published in PUBLISHED.items()
    ]


def with_topk(src: Path, k: int, where: Path) -> Path:
    """`src` with config.json's num_experts_per_tok set to k (its other files linked)."""
    where.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.name != "config.json" and not (where / p.name).exists():
            (where / p.name).symlink_to(p.resolve())
    config = json.loads((src / "config.json").read_text())
    (where / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": k}))
    return where


def score(src: str, w: str, kind: str, tasks, limit, allow_hub: bool, config=None) -> dict:
    """Import `src` into `w`, export its experts, score `tasks` in memory and offloaded."""
    from mole_jax.cli.help import load_config
    from mole_jax.eval.zero_shot import run_tasks
    from mole_jax.infer.export import export_experts, export_lut
    from mole_jax.interop.hf_import import import_hf

    cfg = config or load_config(f"configs/{kind}.py:size=tiny")
    record = dict(imported=import_hf(src, w, cfg))
    if kind == "mole":
        export_lut(w, dtype="float16")
    if kind == "moe":
        export_experts(w, dtype="float16")
    record["scores"] = {}
    for mode in modes_of(kind):
        out = run_tasks(w, list(tasks), mode, limit=limit, allow_hub=allow_hub)
        record["scores"][mode] = {t: row.get("acc") for t, row in out["tasks"].items()}
    return record


def score_all(src: Path, root: Path, name: str, kind: str, tasks, limit, hub: bool, cfg=None):
    """`score`, and for a MoE once more at the paper's top-2."""
    out = {name: score(str(src), str(root / name), kind, tasks, limit, hub, cfg)}
    if kind == "moe":
        top2 = with_topk(src, PAPER_TOPK, root / f"{name}-src-top2")
        out[f"{name} (top-2)"] = score(
            str(top2), str(root / f"{name}-top2"), kind, tasks, limit, hub, cfg
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry_run", action="store_true")
    ap.add_argument("--allow_hub", action="store_true")
    ap.add_argument("--fixtures", action="store_true")
    ap.add_argument("--limit", type=int, default=None, help="documents per task")
    ap.add_argument("--corpus", default=None, help="--fixtures: data.corpus for the task pack")
    ap.add_argument("--workdirs", default=None, help="keep the workdirs here")
    args = ap.parse_args()
    if args.dry_run or not (args.allow_hub or args.fixtures):
        rows = plan_rows()
        print(f"{'model':<15} {'kind':<6} {'params (B)':>10}  modes")
        for r in rows:
            top2 = f" (and top-{PAPER_TOPK})" if r["kind"] == "moe" else ""
            print(
                f"{r['model']:<15} {r['kind']:<6} {r['params_b']:>10}  "
                f"{', '.join(r['modes'])}{top2}"
            )
        print(f"tasks: {', '.join(TASKS)}; run with --allow_hub (network) or --fixtures")
        return
    root = Path(args.workdirs or tempfile.mkdtemp(prefix="released-"))
    out = {}
    if args.fixtures:
        from mole_jax.cli.help import load_config

        for name, kind in FIXTURES.items():
            cfg = load_config(f"configs/{kind}.py:size=tiny")
            if args.corpus:
                cfg.data.corpus = args.corpus
            src = ROOT / "tests" / "fixtures" / "hf" / name
            out.update(
                score_all(src, root, name, kind, ["mole_offline"], args.limit or 8, False, cfg)
            )
        path = RESULTS / "released_fixtures.json"
    else:
        from mole_jax.cli.commands import _hub_snapshot

        for name in PUBLISHED:
            src = Path(_hub_snapshot(f"JieShibo/{name}", True))
            out.update(score_all(src, root, name, kind_of(name), TASKS, args.limit, True))
            out[name]["published"] = dict(zip(TASKS, PUBLISHED[name], strict=True))
        path = RESULTS / "released.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(argv=sys.argv[1:], models=out), indent=1) + "\n")
    for name, rec in out.items():
        for mode, accs in rec["scores"].items():
            print(name, mode, json.dumps(accs))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
