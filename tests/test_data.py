"""Corpus reading, the tokenizer/token cache, the document-level split and deterministic batches."""

import numpy as np
import pytest

from mole_jax.data import corpora, pipeline
from mole_jax.errors import DataError


def test_batches_are_a_pure_function_of_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    a = pipeline.train_batch(tokens, seed=3, step=17, batch_size=4, seq_len=16)
    b = pipeline.train_batch(tokens, seed=3, step=17, batch_size=4, seq_len=16)
    c = pipeline.train_batch(tokens, seed=3, step=18, batch_size=4, seq_len=16)
    d = pipeline.train_batch(tokens, seed=4, step=17, batch_size=4, seq_len=16)
    assert a.shape == (4, 17) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    # Windows are contiguous slices of the stream.
    np.testing.assert_array_equal(np.diff(a, axis=1), 1)


def test_val_windows_are_fixed_consecutive_windows():
    tokens = np.arange(1000, dtype=np.uint16)
    batches = list(pipeline.val_windows(tokens, batch_size=2, seq_len=10, n_batches=3))
    assert len(batches) == 3
    np.testing.assert_array_equal(batches[0][1], np.arange(10, 21))
    with pytest.raises(DataError, match="fewer than one batch"):
        list(pipeline.val_windows(tokens[:30], batch_size=4, seq_len=10, n_batches=1))


def test_prepare_caches_tokenizer_and_tokens(tiny_cfg, corpus_dir):
    td = pipeline.prepare(tiny_cfg)
    assert td.tokenizer.get_vocab_size() <= tiny_cfg.model.vocab_size
    assert td.train.max() < td.tokenizer.get_vocab_size()
    text = "The noble king loves the fair crown."
    assert pipeline.detokenize(td.tokenizer, pipeline.tokenize(td.tokenizer, text)) == text
    again = pipeline.prepare(tiny_cfg)
    assert again.key == td.key
    np.testing.assert_array_equal(again.train, td.train)
    assert td.train.filename == again.train.filename  # a memmap of the cached file


def _lists(splits: dict) -> dict[str, list[str]]:
    return {name: list(docs()) for name, docs in splits.items()}


def test_validation_split_is_held_out_by_document(corpus_dir, cache_dir):
    files = corpora.corpus_files(f"files:{corpus_dir}/*.txt")
    splits = _lists(corpora.split_documents("test", files, 0.2, cache_dir))
    assert splits["train"] and splits["validation"]
    assert len(splits["train"]) + len(splits["validation"]) == len(files)
    assert not set(splits["train"]) & set(splits["validation"])
    texts = {f.read_text() for f in files}
    assert set(splits["validation"]) <= texts  # whole documents, not slices


def test_a_mixture_keeps_each_corpus_split_and_alternates_documents(monkeypatch, tmp_path):
    def fetcher(name, n):
        def fill(tmp):
            for i in range(n):
                (tmp / f"{name}{i}.txt").write_text(f"{name} document {i}")

        return fill

    monkeypatch.setattr(corpora, "NAMED", ("aa", "bb"))
    monkeypatch.setitem(corpora._FETCHERS, "aa", fetcher("aa", 5))
    monkeypatch.setitem(corpora._FETCHERS, "bb", fetcher("bb", 12))
    cache = str(tmp_path)
    alone = {c: _lists(corpora.split_documents(c, corpora.corpus_files(c, cache), 0.3, cache))
             for c in ("aa", "bb")}  # fmt: skip
    files = corpora.corpus_files("aa+bb", cache)
    assert len(files) == 17
    mix = _lists(corpora.split_documents("aa+bb", files, 0.3, cache))
    for s in ("train", "validation"):
        assert sorted(mix[s]) == sorted(alone["aa"][s] + alone["bb"][s])  # no document moves
        n = 2 * min(len(alone["aa"][s]), len(alone["bb"][s]))
        assert [d[:2] for d in mix[s][:n]] == ["aa", "bb"] * (n // 2)
    with pytest.raises(DataError, match="joined by"):
        corpora.corpus_files("aa+nope", cache)
    with pytest.raises(DataError, match="twice"):
        corpora.corpus_files("aa+bb+aa", cache)


def test_jsonl_single_file_is_split_by_row(tmp_path, cache_dir):
    import json

    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document number {i}"}) for i in range(20)))
    splits = _lists(corpora.split_documents("j", [path], 0.25, cache_dir))
    assert len(splits["validation"]) == 5 and len(splits["train"]) == 15


def test_missing_corpus_is_one_clear_error(tiny_cfg, tmp_path):
    tiny_cfg.data.corpus = f"files:{tmp_path}/nothing/*.txt"
    with pytest.raises(DataError, match="no file matches"):
        pipeline.prepare(tiny_cfg)
    tiny_cfg.data.corpus = "wikipedia"
    with pytest.raises(DataError, match="is not one of shakespeare"):
        pipeline.prepare(tiny_cfg)


def test_user_tokenizer_file_is_loaded_and_checked(tiny_cfg, tmp_path):
    tok = pipeline.prepare(tiny_cfg).tokenizer
    n = tok.get_vocab_size()  # the tiny corpus runs out of merges before 512
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.to_str())
    tiny_cfg.data.tokenizer = str(path)
    assert pipeline.prepare(tiny_cfg).tokenizer.get_vocab_size() == n
    tiny_cfg.model.vocab_size = n - 1
    tiny_cfg.data.vocab_size = n - 1
    with pytest.raises(DataError, match=f"the tokenizer has {n} tokens"):
        pipeline.prepare(tiny_cfg)
    tiny_cfg.data.tokenizer = str(tmp_path / "missing.json")
    with pytest.raises(DataError, match="does not exist"):
        pipeline.prepare(tiny_cfg)


def write_megatron(prefix, docs, dtype=np.uint16):
    """A reference writer of Megatron-LM's indexed dataset (core/datasets/indexed_dataset.py:
    _IndexWriter), one sequence per document."""
    import struct

    codes = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.uint16: 8}
    sizes = np.array([len(d) for d in docs], np.int32)
    pointers = (
        np.concatenate([[0], np.cumsum(sizes[:-1].astype(np.int64))]) * np.dtype(dtype).itemsize
    )
    doc_idx = np.arange(len(docs) + 1, dtype=np.int64)
    with open(f"{prefix}.bin", "wb") as f:
        for d in docs:
            f.write(np.asarray(d, dtype).tobytes(order="C"))
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", codes[dtype]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(sizes.tobytes(order="C"))
        f.write(pointers.astype(np.int64).tobytes(order="C"))
        f.write(doc_idx.tobytes(order="C"))


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_reader_returns_the_reference_writers_tokens(tmp_path, dtype):
    from mole_jax.data import megatron

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 500, rng.integers(1, 300)) for _ in range(40)]
    prefix = str(tmp_path / "pile_text_document")
    write_megatron(prefix, docs, dtype)
    streams = megatron.token_streams(prefix, val_fraction=0.1)
    np.testing.assert_array_equal(streams["train"], np.concatenate(docs[:36]))
    np.testing.assert_array_equal(streams["val"], np.concatenate(docs[36:]))
    assert streams["train"].dtype == dtype


def test_megatron_corpus_trains_batches_from_the_memory_map(tiny_cfg, tmp_path):
    tok = pipeline.prepare(tiny_cfg).tokenizer
    (tmp_path / "tok.json").write_text(tok.to_str())
    docs = [np.arange(i, i + 200) % 500 for i in range(20)]
    write_megatron(str(tmp_path / "m"), docs)
    tiny_cfg.data.corpus = f"megatron:{tmp_path}/m"
    with pytest.raises(DataError, match="set data.tokenizer"):
        pipeline.prepare(tiny_cfg)
    tiny_cfg.data.tokenizer = str(tmp_path / "tok.json")
    td = pipeline.prepare(tiny_cfg)
    assert isinstance(td.train, np.memmap) and td.train.size == 16 * 200
    batch = pipeline.train_batch(td.train, 0, 0, 4, 32)
    assert np.all((np.diff(batch, axis=1) == 1) | (np.diff(batch, axis=1) == -499))


def test_long_documents_are_tokenized_in_pieces(monkeypatch):
    monkeypatch.setattr(pipeline, "PIECE_CHARS", 10)
    pieces = list(pipeline._pieces(iter(["one two three four five", "short"])))
    assert "".join(p for p, _ in pieces[:-1]) == "one two three four five"
    assert all(len(p) <= 10 for p, _ in pieces) and [last for _, last in pieces].count(True) == 2


def _write_corpus(directory, megabytes: int) -> int:
    """`megabytes` files of about 1 MB of English-like sentences (fast: vectorised numpy)."""
    rng = np.random.default_rng(0)
    words = np.array(
        "the a noble gentle king queen lord lady knight crown sword castle river night day "
        "heart moon star loves fears seeks keeps leaves finds holds calls sees hears bold fair "
        "dark bright sweet grave proud young old wise".split()
    )
    total = 0
    for i in range(megabytes):
        idx = rng.integers(0, len(words), (20_000, 9))
        lines = [" ".join(row) + f" {n}." for row, n in zip(words[idx], idx[:, 0], strict=True)]
        text = "\n".join(lines)
        (directory / f"part{i:03d}.txt").write_text(text)
        total += len(text)
    return total


@pytest.mark.slow
def test_a_50mb_corpus_trains_in_bounded_memory(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    size = _write_corpus(corpus, 52)
    assert size >= 50 * 2**20
    flags = [
        "train",
        "--config=configs/dense.py:size=tiny",
        f"--config.data.corpus=files:{corpus}/*.txt",
        f"--config.data.cache_dir={tmp_path / 'cache'}",
        "--config.train.steps=2",
        f"--workdir={tmp_path / 'w'}",
    ]
    wrapper = (
        "import resource, runpy, sys\n"
        f"sys.argv = ['launch.py'] + {flags!r}\n"
        "try:\n"
        "    runpy.run_path('launch.py', run_name='__main__')\n"
        "finally:\n"
        "    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "    print('PEAK_RSS_KB', kb, file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", wrapper], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert "trained to step 2" in proc.stdout, proc.stderr[-3000:]
    peak_mb = int(proc.stderr.split("PEAK_RSS_KB")[-1].split()[0]) / 1024
    print(f"peak RSS {peak_mb:.0f} MB for a {size / 2**20:.0f} MB corpus")
    assert peak_mb < 1536, peak_mb


PREPARE = """
import resource, sys
sys.path.insert(0, {root!r})
from configs import dense
from mole_jax.data import pipeline
cfg = dense.get_config("size=tiny")
cfg.data.corpus = "files:{corpus}/*.txt"
cfg.data.cache_dir = {cache!r}
cfg.data.vocab_size = 512
cfg.model.vocab_size = 512
cfg.data.seq_len = 32
pipeline.prepare(cfg)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


@pytest.mark.slow
def test_a_20mb_line_costs_a_few_times_its_size(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT, synthetic_text

    def peak_mb(corpus) -> int:
        code = PREPARE.format(
            root=ROOT, corpus=corpus, cache=str(tmp_path / f"cache-{corpus.name}")
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return int(proc.stdout.split()[-1])

    small, big = tmp_path / "small", tmp_path / "big"
    for d in (small, big):
        d.mkdir()
        (d / "a.txt").write_text(synthetic_text(0, 200))
        (d / "b.txt").write_text(synthetic_text(1, 200))
    words = synthetic_text(2, 2000).split()
    idx = np.random.default_rng(0).integers(0, len(words), 4_200_000)
    line = " ".join(np.array(words)[idx])  # one line of ~22 MB, no newline in it
    (big / "c.txt").write_text(line)
    size_mb = len(line) / 2**20
    assert size_mb >= 20  # the bound is relative: 4x the line's size, at any size
    extra = peak_mb(big) - peak_mb(small)
    print(f"a {size_mb:.0f} MB line costs {extra} MB of peak RSS")
    assert extra <= 4 * size_mb, extra
