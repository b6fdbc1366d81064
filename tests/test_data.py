"""Corpus reading, the tokenizer/token cache, the document-level split and deterministic batches."""

import numpy as np
import pytest

from mole_jax import corpora, data
from mole_jax.errors import DataError


def test_batches_are_a_pure_function_of_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    a = data.train_batch(tokens, seed=3, step=17, batch_size=4, seq_len=16)
    b = data.train_batch(tokens, seed=3, step=17, batch_size=4, seq_len=16)
    c = data.train_batch(tokens, seed=3, step=18, batch_size=4, seq_len=16)
    d = data.train_batch(tokens, seed=4, step=17, batch_size=4, seq_len=16)
    assert a.shape == (4, 17) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    # Windows are contiguous slices of the stream.
    np.testing.assert_array_equal(np.diff(a, axis=1), 1)


def test_val_windows_are_fixed_consecutive_windows():
    tokens = np.arange(1000, dtype=np.uint16)
    batches = list(data.val_windows(tokens, batch_size=2, seq_len=10, n_batches=3))
    assert len(batches) == 3
    np.testing.assert_array_equal(batches[0][1], np.arange(10, 21))
    with pytest.raises(DataError, match="fewer than one batch"):
        list(data.val_windows(tokens[:30], batch_size=4, seq_len=10, n_batches=1))


def test_prepare_caches_tokenizer_and_tokens(tiny_cfg, corpus_dir):
    td = data.prepare(tiny_cfg)
    assert td.tokenizer.get_vocab_size() <= tiny_cfg.model.vocab_size
    assert td.train.max() < td.tokenizer.get_vocab_size()
    text = "The noble king loves the fair crown."
    assert data.detokenize(td.tokenizer, data.tokenize(td.tokenizer, text)) == text
    again = data.prepare(tiny_cfg)
    assert again.key == td.key
    np.testing.assert_array_equal(again.train, td.train)
    assert td.train.filename == again.train.filename  # a memmap of the cached file


def test_validation_split_is_held_out_by_document(corpus_dir, cache_dir):
    files = corpora.corpus_files(f"files:{corpus_dir}/*.txt")
    splits = corpora.load_splits("test", files, 0.2, cache_dir)
    assert splits["train"] and splits["validation"]
    assert len(splits["train"]) + len(splits["validation"]) == len(files)
    assert not set(splits["train"]) & set(splits["validation"])
    texts = {f.read_text() for f in files}
    assert set(splits["validation"]) <= texts  # whole documents, not slices


def test_jsonl_single_file_is_split_by_row(tmp_path, cache_dir):
    import json

    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document number {i}"}) for i in range(20)))
    splits = corpora.load_splits("j", [path], 0.25, cache_dir)
    assert len(splits["validation"]) == 5 and len(splits["train"]) == 15


def test_missing_corpus_is_one_clear_error(tiny_cfg, tmp_path):
    tiny_cfg.data.corpus = f"files:{tmp_path}/nothing/*.txt"
    with pytest.raises(DataError, match="no file matches"):
        data.prepare(tiny_cfg)
    tiny_cfg.data.corpus = "wikipedia"
    with pytest.raises(DataError, match="is not one of shakespeare"):
        data.prepare(tiny_cfg)


def test_user_tokenizer_file_is_loaded_and_checked(tiny_cfg, tmp_path):
    tok = data.prepare(tiny_cfg).tokenizer
    n = tok.get_vocab_size()  # the tiny corpus runs out of merges before 512
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.to_str())
    tiny_cfg.data.tokenizer = str(path)
    assert data.prepare(tiny_cfg).tokenizer.get_vocab_size() == n
    tiny_cfg.model.vocab_size = n - 1
    tiny_cfg.data.vocab_size = n - 1
    with pytest.raises(DataError, match=f"the tokenizer has {n} tokens"):
        data.prepare(tiny_cfg)
    tiny_cfg.data.tokenizer = str(tmp_path / "missing.json")
    with pytest.raises(DataError, match="does not exist"):
        data.prepare(tiny_cfg)
