"""Fault kinds of experiments/faults.py for the workdir's own small files (issue 28, items 4-5).

damage_metrics: metrics.jsonl with bits flipped, truncated, a non-UTF-8 byte or a block of rows
lost, then `train` resumed to step 40: one warning naming the file when rows were lost (none when
none were), the file as found kept aside when it held unreadable rows, every intact row kept and
the curve after step 20 equal to the uninterrupted run's.

damage_checksums: checksums.json truncated, emptied, not JSON or with bits flipped (config.json
edited after it, half of the time): `eval` is refused in one line; `train` with the run's config
writes it again; `eval` then runs, and the checksums verify both files again.

Each returns faults.py's outcome dict plus `landed` (the file really changed) and a `note`. The
helpers come from the module that defined `b`'s class (faults, or __main__ when faults.py runs as
a script), so this module never imports faults.py (which imports it to register the kinds).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from _fault_checks import campaign_module, curve


def _lines(raw: bytes) -> list[bytes]:
    return [line for line in raw.split(b"\n") if line.strip()]


def _row(line: bytes) -> dict | None:
    try:
        row = json.loads(line.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def _damage_rows(path: Path, rng, how: str, f) -> str:
    """Damages metrics.jsonl in place (so that its bytes change); returns what was done."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")[:-1]
    if how == "bytes":
        while True:
            what = f._damage(path, rng)  # flipped bits or truncated at a random length
            if path.read_bytes() != raw:
                return what
            path.write_bytes(raw)
    if how == "non-UTF-8":
        n = rng.randrange(len(lines))
        at = rng.randrange(len(lines[n]))
        lines[n] = lines[n][:at] + bytes([lines[n][at] | 0x80]) + lines[n][at + 1 :]
        what = f"a non-UTF-8 byte in line {n + 1}"
    else:  # a block of 2-8 lines lost: at least one training row (eval rows never adjoin)
        k = rng.randint(2, 8)
        n = rng.randrange(len(lines) - k + 1)
        del lines[n : n + k]
        what = f"lines {n + 1}-{n + k} lost"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return what


def damage_metrics(b, rng, i) -> dict:
    """metrics.jsonl damaged: the resume says so in one line and keeps every intact row."""
    f = campaign_module(b)
    w = b.copy(b.mole, f"metrics_{i}")
    path = w / "metrics.jsonl"
    before = path.read_bytes()
    how = _damage_rows(path, rng, rng.choice(["bytes", "bytes", "non-UTF-8", "block"]), f)
    after = path.read_bytes()
    old, found = _lines(before), _lines(after)
    rows = [_row(line) for line in found]
    # Changed rows that still read as rows of steps up to the checkpoint: no reader can tell
    # (rows carry no checksums); a fault that did nothing else may pass without a word.
    silent = sum(1 for line, row in zip(found, rows, strict=True)
                 if line not in old and row and row["step"] <= 20)  # fmt: skip
    dropped = len(found) != len(old) or silent < len(set(old) - set(found))
    unreadable = None in (rows if after.endswith(b"\n") else rows[:-1])
    runs = [f.launch("train", *b.flags("mole", 40), f"--workdir={w}")]
    said = [x for x in runs[0]["out"].splitlines() if x.startswith(f"warning: {path}")]
    honest = len(said) == 1 if dropped else len(said) <= 1
    aside = sorted(w.glob("metrics.jsonl.damaged-*"))
    kept = [p.read_bytes() for p in aside] == [after] if unreadable else True
    lost = len((set(old) & set(found)) - set(_lines(path.read_bytes()))) + (not kept)
    tail = {s: v for s, v in curve(w).items() if s > 20}
    same = tail == {s: v for s, v in b.curve.items() if s > 20}
    recovered = runs[0]["rc"] == 0 and honest and kept and same
    note = f"{how}; {len(set(old) - set(found))} rows damaged, {silent} of them still readable"
    return dict(f._outcome(runs, recovered, lost, w, 20), landed=after != before,
                silent=silent, note=note)  # fmt: skip


def _damage_sums(path: Path, rng, how: str, f) -> str:
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[: rng.randrange(len(raw))])
    elif how == "emptied":
        path.write_bytes(b"")
    elif how == "not JSON":
        path.write_bytes(raw.replace(b"{", b"<", 1))
    else:
        while path.read_bytes() == raw:
            path.write_bytes(raw)
            how = f._damage(path, rng)  # bits flipped, or truncated
    return how


def _verifies(w: Path) -> bool:
    """Whether checksums.json holds the SHA-256 of config.json and tokenizer.json."""
    try:
        sums = json.loads((w / "checksums.json").read_text())
    except (OSError, ValueError):
        return False
    names = ("config.json", "tokenizer.json")
    return all(sums.get(n) == hashlib.sha256((w / n).read_bytes()).hexdigest() for n in names)


def damage_checksums(b, rng, i) -> dict:
    """checksums.json damaged (config.json edited after it, half of the time): eval refused in
    one line; train with the run's config writes it again; eval runs; checksums verify."""
    f = campaign_module(b)
    w = b.copy(b.mole, f"checksums_{i}")
    sums = w / "checksums.json"
    before = sums.read_bytes()
    how = _damage_sums(sums, rng, rng.choice(["truncated", "emptied", "not JSON", "bytes"]), f)
    landed = sums.read_bytes() != before
    edited = rng.random() < 0.5
    if edited:  # a later edit: eval must not read it
        cfg = json.loads((w / "config.json").read_text())
        cfg["train"]["eval_batches"] += 1
        (w / "config.json").write_text(json.dumps(cfg, indent=2))
    runs = [f.launch("eval", f"--workdir={w}", "--max_tokens=1024")]
    err = runs[0]["err"]
    honest = runs[0]["rc"] == 2 and f._one_error(runs[0])
    honest = honest and ("checksums.json is damaged" in err or "fails its checksum" in err)
    runs += [f.launch("train", *b.flags("mole", 40), f"--workdir={w}"),
             f.launch("eval", f"--workdir={w}", "--max_tokens=1024")]  # fmt: skip
    recovered = honest and runs[-1]["rc"] == 0 and curve(w) == b.curve and _verifies(w)
    note = how + (", config.json edited" if edited else "")
    return dict(f._outcome(runs, recovered, 0 if honest else 1, w, 20), landed=landed,
                note=note)  # fmt: skip
