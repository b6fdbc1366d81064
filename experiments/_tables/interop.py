"""Tables of importing and exporting models (docs/models.md, README): the reference check of
checkpoints the reference code saved (experiments/check_reference.py), the import's memory
(experiments/bench_import.py) and the versions that made the committed fixtures."""

from __future__ import annotations

import json

from _tables import RESULTS, ROOT, load, markdown, renderer

GIB = 2**30


@renderer("interop_reference")
def interop_reference(path: str = "interop/reference_check.json") -> str:
    if not (RESULTS / path).exists():
        return "(not measured yet: `python experiments/check_reference.py --dir=DIR`)"
    rec = load(path)
    rows = [
        [
            r["name"],
            r["kind"],
            f"{r['d_model']} × {r['n_layers']} layers",
            f"{r['logits_max_abs']:.1e} (of {r['logits_scale']:.2f})",
            "identical" if r["greedy_equal"] else "differ",
            f"{r['lut_max_abs']:.1e}" if "lut_max_abs" in r else "-",
        ]
        for r in rec["rows"]
    ]
    header = [
        "checkpoint",
        "kind",
        "shape",
        "logits max abs diff",
        "greedy tokens",
        "LUT vs reparameterize.py",
    ]
    return markdown(header, rows) + f"\n\nMade by `{rec['made_by']}` and `{rec['command']}`."


@renderer("import_memory")
def import_memory(path: str = "interop/bench_import.json") -> str:
    if not (RESULTS / path).exists():
        return "(not measured yet: `python experiments/bench_import.py`)"
    rec = load(path)
    rows = []
    for r in rec["rows"]:
        above = r.get("above_baseline_bytes")
        if above is None:
            rows.append(
                [r["run"], "-", "-", f"{r['peak_rss_bytes'] / GIB:.2f}", "-", f"{r['seconds']:.0f}"]
            )
            continue
        placed = r["placed_above_baseline_bytes"]
        rows.append(
            [
                r["run"],
                f"{placed / GIB:.2f} ({'within' if r['placed_within_bound'] else 'over'})",
                f"{r['bound_bytes'] / GIB:.2f}",
                f"{r['peak_rss_bytes'] / GIB:.2f}",
                f"{above / GIB:.2f} ({'within' if r['within_bound'] else 'over'})",
                f"{r['seconds']:.0f}",
            ]
        )
    header = [
        "import of",
        "read and placed: above baseline GiB",
        "bound GiB (model + 1.3 × largest tensor)",
        "whole import: peak RSS GiB",
        "above baseline GiB",
        "s",
    ]
    note = (
        f"\n\nModel {rec['model_bytes'] / GIB:.2f} GiB in {rec['files']} safetensors files, "
        f"largest tensor {rec['largest_tensor_bytes'] / GIB:.3f} GiB; `{rec['command']}`. "
        '"Read and placed": the peak when every parameter is on its devices; "whole": '
        "after orbax has written the step-0 checkpoint."
    )
    return markdown(header, rows) + note


@renderer("fixture_versions")
def fixture_versions() -> str:
    rows = []
    for d in sorted((ROOT / "tests" / "fixtures" / "hf").iterdir()):
        if (d / "versions.json").exists():
            v = json.loads((d / "versions.json").read_text())
            arch = json.loads((d / "config.json").read_text())["architectures"][0]
            code = (
                f"JieShibo/MoLE@{v['mole_commit'][:7]}"
                if v.get("mole_commit")
                else f"transformers {v['transformers']}"
            )
            rows.append([d.name, arch, code, v["transformers"], v["torch"]])
    return markdown(["fixture", "architecture", "written by", "transformers", "torch"], rows)
