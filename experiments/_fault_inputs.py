"""The invalid configs and command lines of the fault campaign (experiments/faults.py)."""

from __future__ import annotations


def invalid_inputs(b) -> list[list]:
    """Bad configs and command lines: each must end in one `error:` line and exit status 2,
    leaving the workdir as it was. `b`: the campaign's `faults.Base` (root, mole, moe)."""
    d, w, moe = "configs/dense.py:size=tiny", str(b.root / "invalid_w"), str(b.moe)
    cases = [
        ["train", f"--config={d}", f"--workdir={w}", f"--config.{k}={v}"]
        for k, v in [
            ("model.n_heads", 5),
            ("model.d_model", 0),
            ("model.n_layers", -1),
            ("train.steps", 0),
            ("model.ffn.kind", "sparse"),
            ("train.batch_size", -4),
            ("train.microbatches", 3),
            ("data.seq_len", 4096),
            ("model.dtype", "float16"),
            ("train.lr", 0.0),
            ("model.ffn.layers", "0,7"),
            ("data.vocab_size", 9000),
            ("train.stepz", 5),
            ("train.steps", "many"),
            ("data.corpus", "files:/no/such/*"),
            ("data.corpus", "wikipedia"),
            ("data.format", "xml"),
            ("model.remat", "some"),
            ("train.loss_chunk", 7),
            ("mesh.fsdp", 3),
            ("mesh.data", 0),
            ("train.token_tables", "never"),
            ("data.val_fraction", 1.5),
            ("data.tokenizer", "/no/tokenizer.json"),
            ("train.warmup_frac", 1.0),
        ]  # fmt: skip
    ]
    cases += [
        ["train", "--config=configs/dense.py:size=giant", f"--workdir={w}"],
        ["train", "--config=configs/moe.py:size=tiny,experts=4,topk=5", f"--workdir={w}"],
        ["train", "--config=configs/mole.py:size=tiny,input=tokens", f"--workdir={w}"],
        ["train", "--config=configs/nothing.py", f"--workdir={w}"],
        ["train", f"--config={d}"],
        ["frobnicate", f"--workdir={w}"],
        ["eval", f"--workdir={w}"],
        ["eval", f"--workdir={moe}", "--step=99"],
        ["eval", f"--workdir={moe}", "--step=abc"],
        ["eval", f"--workdir={moe}", "--max_tokens=0"],
        ["export", f"--workdir={moe}"],
        ["export", f"--workdir={b.mole}", "--dtype=int3"],
        ["export", f"--workdir={moe}", "--experts", "--dtype=int8"],
        ["generate", f"--workdir={moe}", "--max_new=0"],
        ["generate", f"--workdir={moe}", "--top_k=-5"],
        ["generate", f"--workdir={moe}", "--temperature=-1"],
        ["sweep", "--config=experiments/nothing.py", f"--workdir={w}"],
        ["summary", "--config=configs/dense.py:size=tiny", "--config.mesh.data=0"],
        ["generate", f"--workdir={moe}", b"--prompt=caf\xe9"],  # Latin-1, not UTF-8
        ["train", f"--workdir={moe}", "--config.train.steps=5"],  # fewer than it has trained
        ["train", f"--workdir={b.root / 'base_mole' / 'config.json'}", "--config=" + d],  # a file
    ]
    return cases
