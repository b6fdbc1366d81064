"""corpus -> tokenizer -> tokens cached as a numpy memmap -> deterministic batches.

The tokenizer (byte-level BPE from `tokenizers`, or a user's `tokenizer.json`) and the token
streams are cached under the corpus cache, keyed by the corpus fingerprint and the tokenizer's
hash, so a second run starts without reading the text. Each split is one stream of token ids with
an end-of-text id after every document.

Batches are a pure function of (seed, step): the window starts of step s come from a generator
seeded with (seed, s), so a run resumed at step s sees exactly the batches an uninterrupted run
would have seen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mole_jax import corpora
from mole_jax.errors import DataError
from mole_jax.files import write_text_atomic

EOS = "<|endoftext|>"
TOKENIZER_VERSION = 1  # bump when the BPE recipe changes, to invalidate cached tokenizers


@dataclasses.dataclass
class TokenData:
    train: np.ndarray  # uint16/uint32 memmap, one stream of ids
    val: np.ndarray
    tokenizer: Tokenizer
    key: str  # identifies corpus + tokenizer; used in cache paths and manifests


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _sha(*parts) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def load_tokenizer(path: str) -> Tokenizer:
    if not Path(path).is_file():
        raise DataError(f"data.tokenizer='{path}' does not exist; point it at a tokenizer.json")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - the library raises a bare Exception
        raise DataError(f"data.tokenizer='{path}' is not a tokenizers JSON file ({e})") from None


def prepare(cfg) -> TokenData:
    """Obtains the corpus, the tokenizer and the cached token streams for `cfg.data`."""
    d = cfg.data
    root = corpora.cache_root(d.cache_dir)
    files = corpora.corpus_files(d.corpus, d.cache_dir)
    fp = corpora.fingerprint(d.corpus, files)
    splits = None

    def get_splits():
        nonlocal splits
        if splits is None:
            splits = corpora.load_splits(d.corpus, files, d.val_fraction, d.cache_dir)
        return splits

    if d.tokenizer:
        tok = load_tokenizer(d.tokenizer)
    else:
        tok_path = root / "tokenizers" / _sha(fp, d.val_fraction, d.vocab_size, TOKENIZER_VERSION)
        tok_path = tok_path / "tokenizer.json"
        if not tok_path.exists():
            tok = train_bpe(get_splits()["train"], d.vocab_size)
            write_text_atomic(tok_path, tok.to_str())
        tok = Tokenizer.from_file(str(tok_path))
    n_vocab = tok.get_vocab_size()
    if n_vocab > cfg.model.vocab_size:
        raise DataError(
            f"the tokenizer has {n_vocab} tokens but model.vocab_size={cfg.model.vocab_size}; "
            "raise model.vocab_size or use a smaller data.vocab_size"
        )
    if tok.token_to_id(EOS) is None:
        raise DataError(f"the tokenizer has no '{EOS}' token to separate documents")
    key = _sha(fp, d.val_fraction, hashlib.sha256(tok.to_str().encode()).hexdigest())
    tdir = corpora.atomic_dir(root / "tokens" / key, lambda tmp: _encode(get_splits(), tok, tmp))
    meta = json.loads((tdir / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    streams = {s: np.memmap(tdir / f"{s}.bin", dtype=dtype, mode="r") for s in ("train", "val")}
    for name, arr in streams.items():
        if arr.size < d.seq_len + 2:
            raise DataError(
                f"the {name} split of '{d.corpus}' has {arr.size} tokens, fewer than "
                f"data.seq_len+2={d.seq_len + 2}; use more text or a shorter seq_len"
            )
    return TokenData(streams["train"], streams["val"], tok, key)


def _encode(splits: dict[str, list[str]], tok: Tokenizer, out: Path) -> None:
    eos = tok.token_to_id(EOS)
    dtype = np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32
    for name, docs in (("train", splits["train"]), ("val", splits["validation"])):
        encs = tok.encode_batch(docs)
        parts = [np.asarray(e.ids + [eos], dtype) for e in encs]
        np.concatenate(parts).tofile(out / f"{name}.bin")
    meta = dict(dtype=np.dtype(dtype).name, vocab=tok.get_vocab_size(), docs=len(splits["train"]))
    (out / "meta.json").write_text(json.dumps(meta))


def window_batch(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
    """int32[len(starts), seq_len + 1]: windows of the stream starting at `starts`."""
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    return np.asarray(tokens[idx], dtype=np.int32)


def train_batch(tokens: np.ndarray, seed: int, step: int, batch_size: int, seq_len: int):
    """The training batch of `step`: a pure function of (seed, step). int32[B, seq_len + 1]."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, tokens.size - seq_len - 1, size=batch_size, endpoint=False)
    return window_batch(tokens, starts, seq_len)


def val_windows(tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int):
    """Consecutive non-overlapping windows from the start of the stream, at most `n_batches`.

    The same windows every time, so validation losses of different runs are comparable.
    """
    n_windows = (tokens.size - 1) // seq_len
    n = min(n_batches, n_windows // batch_size)
    if n == 0:
        raise DataError(
            f"validation split has {n_windows} windows of {seq_len} tokens, fewer than one batch "
            f"of {batch_size}; lower train.batch_size or data.seq_len, or raise data.val_fraction"
        )
    for b in range(n):
        starts = (b * batch_size + np.arange(batch_size)) * seq_len
        yield window_batch(tokens, starts, seq_len)


def tokenize(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text).ids


def detokenize(tok: Tokenizer, ids) -> str:
    return tok.decode([int(i) for i in ids])
