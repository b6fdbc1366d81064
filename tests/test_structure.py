"""The package's shape: packages by layer with no import upwards, no import circles among
mole_jax's modules (counting imports inside functions: an earlier main had config -> ffn ->
config), no module over 400 lines, an `__init__` docstring for every package, and no engine or
benchmark code that branches on an engine's type."""

import ast
import os
import re
import sys
from pathlib import Path

from conftest import ROOT

from mole_jax import LAYERS

# The import graph is built by the docs' renderer of it (docs/development.md), so the page and
# this test read one graph.
sys.path.insert(0, os.path.join(ROOT, "experiments"))
from _tables.code import import_graph  # noqa: E402

PKG = Path(ROOT) / "mole_jax"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (found := visit(n, [*path, n])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_no_import_circles():
    graph = import_graph()
    assert len(graph) > 30 and graph["mole_jax.model.backbone"] >= {
        "mole_jax.model.ffn",
        "mole_jax.model.scan",
    }
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def layer_of(module: str) -> int:
    """The index in `mole_jax.LAYERS` of the layer `module` belongs to."""
    top = module.split(".")[1] if "." in module else ""
    hits = [i for i, names in enumerate(LAYERS) if top in names]
    assert hits, f"{module} is in no layer of mole_jax.LAYERS: add its package there"
    return hits[0]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} -> {d}"
        for m, deps in graph.items()
        if m != "mole_jax"
        for d in deps
        if d != "mole_jax" and layer_of(d) > layer_of(m)
    )


def test_lower_layers_never_import_higher_ones():
    graph = import_graph()
    assert not upward_imports(graph), "imports upwards:\n" + "\n".join(upward_imports(graph))
    # the check itself: a model module importing the trainer is caught
    bad = {"mole_jax.model.backbone": {"mole_jax.train.trainer"}, "mole_jax.train.trainer": set()}
    assert upward_imports(bad) == ["mole_jax.model.backbone -> mole_jax.train.trainer"]
    assert layer_of("mole_jax.errors") < layer_of("mole_jax.parallel.sharding")
    assert layer_of("mole_jax.cli.commands") == len(LAYERS) - 1


def test_every_package_says_what_it_owns_and_no_module_is_over_400_lines():
    for init in PKG.rglob("__init__.py"):
        if "mole_offline" in init.parts:
            continue
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 60, f"{init} has no docstring saying what the package owns"
    long = [f"{p} ({n})" for p in PKG.rglob("*.py") if (n := p.read_text().count("\n")) > 400]
    assert not long, long


def test_no_code_branches_on_an_engine_type():
    pattern = re.compile(r"isinstance\([^)]*,\s*\(?[\w., ]*Engine\b")
    files = [*PKG.rglob("*.py"), *(Path(ROOT) / "experiments").glob("*.py")]
    hits = [f"{p}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]  # fmt: skip
    assert not hits
    assert pattern.search("if isinstance(engine, MoeOffloadEngine):")
