"""What a compiled program says about itself: the collectives of its optimised per-device HLO
(op, count, bytes) and XLA's cost analysis, read the same way for every platform."""

from __future__ import annotations

import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all", "collective-broadcast")  # fmt: skip
# '%ag.1 = bf16[8,256]{1,0} all-gather(...)', '%rs = (f32[..], f32[..]) reduce-scatter-start(...)'
_OP = "|".join(re.escape(c) for c in sorted(COLLECTIVES, key=len, reverse=True))
_INSTR = re.compile(rf"^\s*(?:ROOT\s+)?%?\S+\s*=\s*(.+?)\s+({_OP})(-start|-done)?\(")
_SHAPE = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
          "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
          "c128": 16}  # fmt: skip


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


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{op: {'count', 'bytes'}} over the program's collectives (an async pair counted once, at
    its start), bytes being each result's size on one device."""
    out: dict[str, dict[str, int]] = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m or m.group(3) == "-done":
            continue
        shape, op = m.group(1), m.group(2)
        entry = out.setdefault(op, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += shape_bytes(_result(shape, m.group(3) == "-start"))
    return out


def while_loops(hlo_text: str) -> list[int]:
    """The known trip counts of the program's while loops (a scanned layer stack is one)."""
    return [int(n) for n in re.findall(r'"known_trip_count":\{"n":"(\d+)"\}', hlo_text)]


def cost(compiled) -> dict:
    """XLA's per-device cost analysis: flops and bytes accessed. A deviceless GPU compile gives
    none; XLA's HloCostAnalysis is then run on its optimised module by the CPU client (jax's
    internal binding: None if it is not there)."""
    ca = compiled.cost_analysis()
    if isinstance(ca, list):
        ca = ca[0] if ca else None
    source = "compiler"
    if not ca:
        ca, source = _module_cost(compiled), "HloCostAnalysis of the optimised module"
    if not ca:
        return {"flops": None, "bytes_accessed": None, "source": None}
    return {"flops": ca.get("flops"), "bytes_accessed": ca.get("bytes accessed"), "source": source}


def _module_cost(compiled) -> dict | None:
    try:
        import jax
        from jax._src.lib import _jax

        module = compiled.runtime_executable().hlo_modules()[0]
        return dict(_jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module))
    except (AttributeError, ImportError, IndexError, RuntimeError, TypeError):
        return None
