"""Renderers that read the code itself rather than experiments/results/: the import graph between
mole_jax's packages (`layer_graph`, the graph tests/test_structure.py checks), the SIZES table
(`sizes`) and the parameter counts of the paper configurations (`param_counts`, from
`mole_jax.train.accounting.summarize`, which evaluates the model abstractly and allocates
nothing)."""

from __future__ import annotations

import ast
import functools
import importlib
import re
from pathlib import Path

from _tables import ROOT, markdown, renderer

PKG = ROOT / "mole_jax"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The mole_jax modules `path` imports (at module level or inside a function)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mole_jax"):
            for a in node.names:  # `from mole_jax import ffn`: the module, else its package
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in modules else node.module)
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: the mole_jax modules it imports}, for every module of mole_jax."""
    files = {_module(p): p for p in PKG.rglob("*.py")}
    return {m: _imports(p, set(files)) - {m} for m, p in files.items()}


def _top(module: str) -> str:
    """The top-level package (or ground-floor module) of a mole_jax module; '' for mole_jax."""
    return module.split(".")[1] if "." in module else ""


def package_imports(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """{package: the other packages its modules import}, from `import_graph()`."""
    out: dict[str, set[str]] = {}
    for module, deps in graph.items():
        if top := _top(module):
            out.setdefault(top, set()).update(_top(d) for d in deps if _top(d) not in ("", top))
    return out


def _owns(name: str) -> str:
    """The first sentence of the package's `__init__` docstring (a ground-floor module's own)."""
    path = PKG / name / "__init__.py" if (PKG / name).is_dir() else PKG / f"{name}.py"
    doc = " ".join((ast.get_docstring(ast.parse(path.read_text())) or "").split())
    end = re.search(r"\.(\s|$)", doc)
    return (doc[: end.start() + 1] if end else doc).replace("|", "\\|")


@renderer("layer_graph")
def layer_graph() -> str:
    """One row per package of `mole_jax.LAYERS`, lowest first: what it owns and what it imports."""
    from mole_jax import LAYERS

    order = [name for layer in LAYERS for name in layer]
    deps = package_imports(import_graph())
    rows = []
    for i, layer in enumerate(LAYERS):
        for name in layer:
            imported = sorted(deps.get(name, ()), key=order.index)
            rows.append([i, f"`{name}`", _owns(name), ", ".join(f"`{d}`" for d in imported) or "–"])
    return markdown(["layer", "package", "what it owns", "imports from mole_jax"], rows)


@renderer("sizes")
def sizes() -> str:
    """`mole_jax.config.SIZES`: the model shape and training defaults of every size."""
    from mole_jax.config import SIZES

    keys = ("n_layers", "d_model", "n_heads", "d_ff", "vocab_size", "seq_len", "batch_size")
    rows = [
        [f"`{name}`", *(f"{s[k]:,}" for k in keys), f"{s['steps']:,}", f"{s['lr']:g}"]
        for name, s in SIZES.items()
    ]
    header = ["size", "layers", "D", "heads", "F", "vocab", "seq", "batch", "steps", "lr"]
    return markdown(header, rows)


# The MoLE paper's configurations: (config file, argument, name, Table 2 "params in training"
# in billions; tests/test_config.py holds the counts to them within 2 %).
PAPER = (
    ("dense", "size=160m", "dense", 0.16),
    ("moe", "size=160m,experts=10", "MoE-10E", 0.39),
    ("mole", "size=160m,experts=4", "MoLE-4E", 0.39),
    ("moe", "size=160m,experts=34", "MoE-34E", 1.07),
    ("mole", "size=160m,experts=16", "MoLE-16E", 1.07),
    ("dense", "size=410m", "dense", 0.41),
    ("moe", "size=410m,experts=10", "MoE-10E", 1.21),
    ("mole", "size=410m,experts=4", "MoLE-4E", 1.21),
    ("moe", "size=410m,experts=34", "MoE-34E", 3.63),
    ("mole", "size=410m,experts=16", "MoLE-16E", 3.63),
    ("dense", "size=1b", "dense", 1.01),
    ("moe", "size=1b,experts=10", "MoE-10E", 3.16),
    ("mole", "size=1b,experts=4", "MoLE-4E", 3.16),
)


@functools.cache
def _summary(kind: str, arg: str) -> dict:
    """`accounting.summarize` of configs/<kind>.py:<arg>, parameters only (without the mesh, so
    no memory plan is made)."""
    from mole_jax.train import accounting

    cfg = importlib.import_module(f"configs.{kind}").get_config(arg).copy_and_resolve_references()
    with cfg.unlocked():
        del cfg["mesh"]
    return accounting.summarize(cfg)


def _billions(n: int) -> str:
    return f"{n:,} ({n / 1e9:.4f} B)"


@renderer("param_counts")
def param_counts(what: str = "params") -> str:
    """The paper configurations' parameters (`what=params`: in training, against the paper's
    Table 2, resident at inference, active per token) or their MoLE LUTs (`what=lut`: values in
    all and per token, bytes per token by stored dtype, scales included)."""
    if what == "lut":
        return _lut_counts()
    header = ["config", "model", "params in training", "paper (Table 2)"]
    header += ["resident at inference", "active per token"]
    rows = []
    for kind, arg, name, paper in PAPER:
        s = _summary(kind, arg)
        rows.append(
            [
                f"`{kind}.py:{arg}`",
                name,
                _billions(s["params_total"]),
                f"{paper} B",
                f"{s['params_resident']:,}",
                f"{s['params_active_per_token']:,}",
            ]
        )
    return markdown(header, rows)


def _lut_counts() -> str:
    dtypes = ("float16", "int8", "nf4", "nf3")
    header = ["config", "LUT values", "values per token", "LUT in float16 (GiB)"]
    header += [f"bytes per token, {dt}" for dt in dtypes]
    rows = []
    for kind, arg, _, _ in PAPER:
        if kind != "mole":
            continue
        s = _summary(kind, arg)
        per = s["lut_bytes_per_token"]
        rows.append(
            [
                f"`{kind}.py:{arg}`",
                f"{s['lut_values']:,}",
                f"{s['lut_values_per_token']:,}",
                f"{s['lut_bytes']['float16'] / 2**30:.2f}",
                *(f"{per[dt]:,}" for dt in dtypes),
            ]
        )
    return markdown(header, rows)
