"""What a compiled program says about itself, per step: XLA's cost analysis (FLOPs, bytes
accessed) and the collectives of its optimised per-device HLO, with every while loop's body
multiplied out by its trip count (XLA's cost analysis and a plain reading of the text count a
loop body once; a scanned layer stack or a micro-batch loop is such a body).

The optimised module's text is split into its computations; each computation's multiplicity is
the product of the trip counts of the loops it sits in. FLOPs and bytes: the module's cost, plus
for every loop (n - 1) times its body's cost, the body analysed as a module of its own (nested
loops recursively). Trip counts come from the loop's `known_trip_count` (GPU) or from its
condition, `i < N` with `i` starting at a constant (TPU prints no trip count)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all", "collective-broadcast")  # fmt: skip
# '%ag.1 = bf16[8,256]{1,0} all-gather(...)', '%rs = (f32[..], f32[..]) reduce-scatter-start(...)'
_OP = "|".join(re.escape(c) for c in sorted(COLLECTIVES, key=len, reverse=True))
_INSTR = re.compile(rf"^\s*(?:ROOT\s+)?%?\S+\s*=\s*(.+?)\s+({_OP})(-start|-done)?\(")
_SHAPE = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
          "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
          "c128": 16}  # fmt: skip
_WHILE = re.compile(r"^\s*(?:ROOT\s+)?%?\S+\s*=.*?\swhile\(%?([\w.\-]+)\),\s*"
                    r"condition=%?([\w.\-]+),\s*body=%?([\w.\-]+)")  # fmt: skip
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_REF = re.compile(r"%([\w.\-]+)")
_END = re.compile(r"^\}(,\s*execution_thread=\S+)?\s*$")
_METADATA = re.compile(r",\s*metadata=\{[^{}]*\}")


@dataclasses.dataclass(frozen=True)
class Loop:
    body: str
    condition: str
    trips: int | None  # None: not read off the program (then counted once)


@dataclasses.dataclass
class Program:
    """The optimised module's text split into computations (name -> its instruction lines)."""

    entry: str
    bodies: dict[str, list[str]]

    def callees(self, name: str) -> set[str]:
        return {r for line in self.bodies[name] for r in _REF.findall(line)
                if r in self.bodies and r != name}  # fmt: skip

    def loops(self, name: str) -> list[Loop]:
        """The while loops whose instruction is in computation `name`."""
        out = []
        for line in self.bodies[name]:
            m = _WHILE.match(line)
            if m:
                init, cond, body = m.groups()
                out.append(Loop(body, cond, _trips(self, line, name, init, cond)))
        return out

    def reachable(self, root: str) -> list[str]:
        """`root` and every computation it calls, callees before their callers."""
        order: list[str] = []
        seen: set[str] = set()
        stack = [(root, False)]
        while stack:
            name, done = stack.pop()
            if done:
                order.append(name)
            elif name not in seen:
                seen.add(name)
                stack.append((name, True))
                stack.extend((c, False) for c in self.callees(name) if c not in seen)
        return order

    def module(self, root: str) -> str:
        """A module text with `root` as its entry computation and everything it calls."""
        names = self.reachable(root)
        parts = [f"HloModule {root.replace('.', '_')}_module", ""]
        for name in names:
            head, *rest = self.bodies[name]
            head = re.sub(r"^(ENTRY\s+)?", "ENTRY " if name == root else "", head)
            parts.append(_METADATA.sub("", "\n".join([head, *rest])))
        return "\n\n".join(parts) + "\n"


def parse(text: str) -> Program:
    """Splits an optimised module's text (`compiled.as_text()`) into its computations."""
    bodies: dict[str, list[str]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            if line.endswith("{") and line[:1] not in (" ", "\t", "") and "HloModule" not in line:
                is_entry = line.startswith("ENTRY ")
                current = line.removeprefix("ENTRY ").split()[0].lstrip("%")
                entry = current if is_entry else entry
                bodies[current] = [line]
            continue
        if _END.match(line):  # "}" or "}, execution_thread=..." (attribute text may span lines)
            bodies[current].append(line)
            current = None
        else:
            bodies[current].append(line)
    return Program(entry, bodies)


def _operands(text: str) -> list[str]:
    """'%a, /*index=5*/%b' -> ['a', 'b']"""
    return [re.sub(r"/\*.*?\*/", "", o).strip().lstrip("%") for o in text.split(",")]


def _instruction(prog: Program, comp: str, name: str) -> str | None:
    pat = re.compile(rf"^\s*(?:ROOT\s+)?%?{re.escape(name)}\s*=")
    return next((line for line in prog.bodies[comp] if pat.match(line)), None)


def _constant(prog: Program, comp: str, name: str, depth: int = 8) -> int | None:
    """The integer a scalar instruction holds when it is a constant (through copies)."""
    line = _instruction(prog, comp, name) or ""
    m = re.search(r"\bconstant\((-?\d+)\)", line)
    if m:
        return int(m.group(1))
    src = re.search(r"\s(?:copy|bitcast|convert)\(%?([\w.\-]+)\)", line)
    return _constant(prog, comp, src.group(1), depth - 1) if src and depth else None


def _trips(prog: Program, line: str, comp: str, init: str, cond: str) -> int | None:
    """The trip count: XLA's annotation, else `i < N` in the condition with i's start a
    constant in the loop's initial tuple."""
    m = _TRIP.search(line)
    if m:
        return int(m.group(1))
    compared = _compared(prog, cond)
    if compared is None:
        return None
    index = re.search(
        r"get-tuple-element\(.*index=(\d+)", _instruction(prog, cond, compared[0]) or ""
    )
    limit = _constant(prog, cond, compared[1])
    tup = _instruction(prog, comp, init)
    if index is None or limit is None or tup is None or " tuple(" not in tup:
        return None
    operands = _operands(re.search(r" tuple\((.*?)\)(?:,|$)", tup).group(1))
    start = _constant(prog, comp, operands[int(index.group(1))])
    return None if start is None else limit - start


_LT = re.compile(r"compare\(%?([\w.\-]+),\s*%?([\w.\-]+)\),\s*direction=LT")
_FUSION = re.compile(r"\sfusion\(([^)]*)\).*?calls=%?([\w.\-]+)")


def _compared(prog: Program, cond: str) -> tuple[str, str] | None:
    """(i, N) of a loop condition whose root is `i < N`, directly or as a fused compare."""
    root = next((x for x in prog.bodies.get(cond, []) if x.lstrip().startswith("ROOT")), "")
    m = _LT.search(root)
    if m:
        return m.group(1), m.group(2)
    fused = _FUSION.search(root)
    if not fused or fused.group(2) not in prog.bodies:
        return None
    operands = _operands(fused.group(1))
    inner = _compared(prog, fused.group(2))
    params = {
        n: int(i)
        for n, i in re.findall(
            r"%?([\w.\-]+) = \S+ parameter\((\d+)\)", "\n".join(prog.bodies[fused.group(2)])
        )
    }
    if inner is None or not all(p in params for p in inner):
        return None
    return operands[params[inner[0]]], operands[params[inner[1]]]


def multiplicities(prog: Program) -> dict[str, int]:
    """How many times each computation runs per execution of the entry: the product of the
    trip counts of the loops around it (a computation called from several places, such as a
    reducer, gets the largest)."""
    mult: dict[str, int] = {}

    def walk(name: str, m: int) -> None:
        if mult.get(name, 0) >= m:
            return
        mult[name] = m
        loops = prog.loops(name)
        factor = {lp.body: lp.trips or 1 for lp in loops}
        for callee in prog.callees(name):
            walk(callee, m * factor.get(callee, 1))

    walk(prog.entry, 1)
    return mult


def all_loops(prog: Program) -> list[Loop]:
    """Every while loop the entry reaches (a scanned layer stack is one, its backward another)."""
    return [lp for name in prog.reachable(prog.entry) for lp in prog.loops(name)]


def _outer_loops(prog: Program, root: str) -> list[Loop]:
    """Loops reachable from `root` without entering another loop's body."""
    found, seen, todo = [], set(), [root]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        loops = prog.loops(name)
        found += loops
        inner = {lp.body for lp in loops} | {lp.condition for lp in loops}
        todo.extend(c for c in prog.callees(name) if c not in inner)
    return found


Analyse = Callable[[str], dict]


def loop_cost(prog: Program, analyse: Analyse) -> dict:
    """FLOPs and bytes accessed per execution of the entry with loop bodies multiplied out:
    T(x) = C(x) + sum over x's loops of (n T(body) - C(body)), C from `analyse(module text)`."""
    cache: dict[str, dict] = {}

    def once(name: str) -> dict:
        if name not in cache:
            c = analyse(prog.module(name))
            cache[name] = {"flops": c.get("flops", 0.0), "bytes": c.get("bytes accessed", 0.0)}
        return cache[name]

    def total(name: str) -> dict:
        out = dict(once(name))
        for lp in _outer_loops(prog, name):
            if lp.trips and lp.trips > 1:
                inner, body = total(lp.body), once(lp.body)
                for k in out:
                    out[k] += lp.trips * inner[k] - body[k]
        return out

    t = total(prog.entry)
    return {"flops": t["flops"], "bytes_accessed": t["bytes"], "once": once(prog.entry)}


def shape_bytes(text: str) -> int:
    """Bytes of the array shapes in an HLO type ('bf16[8,256]{1,0}', or a tuple of them)."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        n = _BYTES.get(dtype, 0)
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n
    return total


def _result(shape: str, asynchronous: bool) -> str:
    """An async collective's type is (operands, result): its last element is what it moves."""
    if asynchronous and shape.startswith("("):
        parts = re.findall(r"[a-z]+\d*[a-z0-9]*\[[\d,]*\]", shape)
        return parts[-1] if parts else shape
    return shape


def collectives(prog: Program) -> dict[str, dict[str, int]]:
    """{op: {'count', 'bytes'}} per execution of the entry: each collective instruction (an
    async pair counted once, at its start) times its computation's multiplicity, bytes being
    each result's size on one device."""
    out: dict[str, dict[str, int]] = {}
    for name, m in multiplicities(prog).items():
        for line in prog.bodies[name]:
            hit = _INSTR.match(line)
            if not hit or hit.group(3) == "-done":
                continue
            shape, op = hit.group(1), hit.group(2)
            entry = out.setdefault(op, {"count": 0, "bytes": 0})
            entry["count"] += m
            entry["bytes"] += m * shape_bytes(_result(shape, hit.group(3) == "-start"))
    return out


def analyse_with_cpu_client(module_text: str) -> dict:
    """XLA's HloCostAnalysis of a module text, run by the CPU client (jax's internal binding:
    ImportError/AttributeError where a jax release moved it)."""
    import jax
    from jax._src.lib import _jax
    from jaxlib import _hlo

    module = _hlo.hlo_module_from_text(module_text)
    return dict(_jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module))


def cost(compiled, prog: Program) -> dict:
    """Per-device FLOPs and bytes accessed of one step with loops multiplied out (HloCostAnalysis
    of the optimised module, by the CPU client for every platform, so that the module and its
    loop bodies are counted alike); beside them the same analysis counting each body once and
    the compiler's own figures (also once per body; None for a deviceless GPU compile)."""
    ca = compiled.cost_analysis()
    ca = (ca[0] if ca else None) if isinstance(ca, list) else ca
    own = {"flops": ca.get("flops"), "bytes_accessed": ca.get("bytes accessed")} if ca else None
    try:
        t = loop_cost(prog, analyse_with_cpu_client)
    except (AttributeError, ImportError, RuntimeError, ValueError):
        return {"flops": None, "bytes_accessed": None, "source": None, "compiler": own}
    return {"flops": t["flops"], "bytes_accessed": t["bytes_accessed"],
            "counted_once": {"flops": t["once"]["flops"], "bytes_accessed": t["once"]["bytes"]},
            "source": "HloCostAnalysis of the optimised module, loop bodies x trip counts",
            "compiler": own}  # fmt: skip
