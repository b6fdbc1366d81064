"""Renderers of the studies' verdicts: each study file's declared claims (`CLAIMS`), tested live
on the rows its sweep wrote (`mole_jax/sweeps/claims.py`: paired where runs share seeds, Holm
within the study, effect, 95 % interval, p and the minimum detectable effect on every line).

    study_verdicts NAME [STUDY]   the claims of experiments/<STUDY>.py (default: the file the
                                  sweep under experiments/results/studies/<NAME>/ ran) on its rows
    convert_verdicts JSON...      convert_vs_pruned.py's claims on the JSONs of one setting's seeds
    verdict_summary SPEC...       one row per study (SPEC: NAME[=STUDY], or convert=JSON+JSON):
                                  its verdicts counted, then every resolved verdict line

A claim is post hoc when the sweep's claims.json does not record it before the runs: true of every
sweep shipped so far, and the header of each block says so.
"""

from __future__ import annotations

import json
import re

from _tables import RESULTS, ROOT, markdown, renderer
from _tables.studies import _sweep
from ml_collections import ConfigDict

from mole_jax.sweeps import claims

_MODULES: dict[str, object] = {}  # a file is imported once (convert_vs_pruned defines flags)
WORDS = ("reproduced", "contradicted", "not resolved at this scale", "no verdict")


def study_module(path: str):
    """experiments/<study>.py imported (once per process), by its path from the repository."""
    if path not in _MODULES:
        from mole_jax.config import load_module

        _MODULES[path] = load_module(str(ROOT / path))
    return _MODULES[path]


def _declared(out: dict, declared: list, rows: list[dict]) -> dict:
    """The sweep's record of its claims when it holds these very claims, else post hoc: every
    row had finished before the claims were declared."""
    rec = out.get("claims")
    if rec and rec.get("claims") == claims.describe(declared):
        return rec
    return {"declared_after_runs": len(rows)}


def tested(spec: str) -> tuple[str, list, list[dict], dict]:
    """(study file, its claims, the rows they are tested on, the declaration record) of a SPEC:
    `NAME[=STUDY]` (a sweep's results) or `convert=JSON+JSON...` (convert_vs_pruned's)."""
    name, _, arg = spec.partition("=")
    if name == "convert":
        path = "experiments/convert_vs_pruned.py"
        results = [json.loads((RESULTS / f).read_text()) for f in arg.split("+")]
        module = study_module(path)
        rows = module.claim_rows(results)
        return path, claims.study_claims(module), rows, {"declared_after_runs": len(rows)}
    out = _sweep(name)
    path = f"experiments/{arg}.py" if arg else out["study"].partition(":")[0]
    study_cfg = ConfigDict(out["study_config"]) if "study_config" in out else None
    declared = claims.study_claims(study_module(path), study_cfg)
    return path, declared, out["rows"], _declared(out, declared, out["rows"])


def verdict_text(path: str, declared: list, rows: list[dict], rec: dict) -> str:
    """claims.section's verdict lines (each ends with its claim's source)."""
    if not declared:
        return f"- `{path}` declares no claim (a measurement; the file says why)"
    return claims.section(rows, declared, rec, "")


@renderer("study_verdicts")
def study_verdicts(name: str, study: str = "") -> str:
    """The declared claims of a study file tested on one sweep's rows."""
    return verdict_text(*tested(f"{name}={study}" if study else name))


@renderer("convert_verdicts")
def convert_verdicts(*files: str) -> str:
    """convert_vs_pruned.py's claims on the JSONs it wrote for one setting, one per seed."""
    return verdict_text(*tested("convert=" + "+".join(files)))


def _word(line: str) -> str:
    return next(w for w in WORDS if f": {w} —" in line)


def _paper(declared: list) -> str:
    sources = [re.match(r"[^:;]*", c.source)[0].strip() for c in declared if c.source]
    return ", ".join(dict.fromkeys(sources)) or "-"


@renderer("verdict_summary")
def verdict_summary(*specs: str) -> str:
    """Per study: its declared claims counted by verdict (with the minimum detectable effects of
    the unresolved ones), then each reproduced or contradicted verdict in full."""
    rows, resolved, post = [], [], 0
    for spec in specs:
        path, declared, data, rec = tested(spec)
        post += bool(declared and rec.get("declared_after_runs"))
        lines = claims.verdicts(data, declared) if declared else []
        words = [_word(v) for v in lines]
        mdes = [float(m[1]) for v in lines if _word(v) == WORDS[2]
                for m in [re.search(r"MDE ([\d.]+)", v)]]  # fmt: skip
        unresolved = str(len(mdes)) + (
            f" (MDE {min(mdes):.3f}–{max(mdes):.3f})" if len(mdes) > 1
            else f" (MDE {mdes[0]:.3f})" if mdes else ""
        )  # fmt: skip
        stem = path.rsplit("/", 1)[-1].removesuffix(".py")
        rows.append([f"`{stem}`", _paper(declared), len(lines), words.count(WORDS[0]),
                     words.count(WORDS[1]), unresolved, words.count(WORDS[3])])  # fmt: skip
        resolved += [f"- `{stem}`: {v}" for v in lines if _word(v) in WORDS[:2]]
    table = markdown(["study", "paper", "claims", "reproduced", "contradicted",
                      "not resolved at this scale", "no verdict (no spread)"], rows)  # fmt: skip
    n = sum(r[2] > 0 for r in rows)  # the studies that declare claims
    who = "Every study" if post == n else f"{post} of the {n} studies"
    when = (f"{who} declared its claims after the runs had finished: the verdicts are post hoc "
            "until a re-run confirms them." if post else
            "Every claim was declared before its runs.")  # fmt: skip
    return "\n\n".join([table, when, "The resolved verdicts (Holm-corrected within each study):",
                        "\n".join(resolved) or "- none"])  # fmt: skip
