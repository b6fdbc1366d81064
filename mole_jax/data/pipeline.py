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
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mole_jax.data import corpora, megatron
from mole_jax.errors import DataError
from mole_jax.files import write_text_atomic

EOS = "<|endoftext|>"  # the end-of-text token of the BPE this pipeline trains
# A given tokenizer's end-of-text token: the first of these it has (GPT-2/NeoX, Llama 1-2,
# Llama 3, Gemma); documents are separated by it.
EOS_TOKENS = (EOS, "</s>", "<|end_of_text|>", "<eos>")


def eos_token(tok) -> str | None:
    """The end-of-text token of `tok` (EOS_TOKENS), or None when it has none."""
    return next((t for t in EOS_TOKENS if tok.token_to_id(t) is not None), None)


TOKENIZER_VERSION = 1  # bump when the BPE recipe changes, to invalidate cached tokenizers
TOKENIZER_SAMPLE_BYTES = 64 * 2**20  # characters of training text a BPE is learnt from
PIECE_CHARS = 2**20  # longer documents are tokenized in pieces of at most this many characters
ENCODE_BATCH_CHARS = 8 * 2**20  # characters tokenized per batch


@dataclasses.dataclass
class TokenData:
    train: np.ndarray  # uint16/uint32 memmap, one stream of ids
    val: np.ndarray
    tokenizer: Tokenizer
    key: str  # identifies corpus + tokenizer; used in cache paths and manifests


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
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
    if d.corpus.startswith("megatron:"):
        return _megatron(cfg)
    root = corpora.cache_root(d.cache_dir)
    files = corpora.corpus_files(d.corpus, d.cache_dir)
    fmt = d.get("format", "auto")
    fp = corpora.fingerprint(d.corpus, files) + ("" if fmt == "auto" else f"-{fmt}")
    splits = functools.cache(
        lambda: corpora.split_documents(d.corpus, files, d.val_fraction, d.cache_dir, fmt)
    )
    if d.tokenizer:
        tok = load_tokenizer(d.tokenizer)
    else:
        tok_path = root / "tokenizers" / _sha(fp, d.val_fraction, d.vocab_size, TOKENIZER_VERSION)
        tok = _cached_tokenizer(tok_path / "tokenizer.json")
        if tok is None:
            tok = train_bpe(_capped(splits()["train"](), TOKENIZER_SAMPLE_BYTES), d.vocab_size)
            write_text_atomic(tok_path / "tokenizer.json", tok.to_str())
    n_vocab = tok.get_vocab_size()
    if n_vocab > cfg.model.vocab_size:
        raise DataError(
            f"the tokenizer has {n_vocab} tokens but model.vocab_size={cfg.model.vocab_size}; "
            "raise model.vocab_size or use a smaller data.vocab_size"
        )
    if eos_token(tok) is None:
        raise DataError(f"the tokenizer has none of {', '.join(EOS_TOKENS)} to separate documents")
    key = _sha(fp, d.val_fraction, hashlib.sha256(tok.to_str().encode()).hexdigest())
    tdir = root / "tokens" / key
    _check_token_cache(tdir)
    tdir = corpora.atomic_dir(tdir, lambda tmp: _encode(splits(), tok, tmp))
    meta = json.loads((tdir / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    for s in ("train", "val"):
        if (tdir / f"{s}.bin").stat().st_size == 0:
            raise DataError(f"the {s} split of '{d.corpus}' has no documents: is the text empty?")
    streams = {s: np.memmap(tdir / f"{s}.bin", dtype=dtype, mode="r") for s in ("train", "val")}
    for name, arr in streams.items():
        if arr.size < d.seq_len + 2:
            raise DataError(
                f"the {name} split of '{d.corpus}' has {arr.size} tokens, fewer than "
                f"data.seq_len+2={d.seq_len + 2}; use more text or a shorter seq_len"
            )
    return TokenData(streams["train"], streams["val"], tok, key)


def _megatron(cfg) -> TokenData:
    """A pre-tokenised Megatron dataset, used as it is; its tokenizer comes from data.tokenizer
    (eval and generate need it to turn text into the same ids)."""
    d = cfg.data
    prefix = d.corpus.removeprefix("megatron:")
    if not d.tokenizer:
        raise DataError(
            f"data.corpus='{d.corpus}' is pre-tokenised: set data.tokenizer to the tokenizer.json "
            "it was tokenised with"
        )
    tok = load_tokenizer(d.tokenizer)
    streams = megatron.token_streams(prefix, d.val_fraction)  # ids checked batch by batch
    key = _sha(d.corpus, d.val_fraction, hashlib.sha256(tok.to_str().encode()).hexdigest())
    return TokenData(streams["train"], streams["val"], tok, key)


def _cached_tokenizer(path: Path) -> Tokenizer | None:
    """The cached BPE, or None when there is none or it does not load (then it is retrained)."""
    if not path.exists():
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception:  # noqa: BLE001 - the library raises a bare Exception
        print(f"warning: the cached tokenizer {path} is corrupt; training it again", flush=True)
        path.unlink()
        return None


def _check_token_cache(tdir: Path) -> None:
    """A cached token store whose files do not match the SHA-256 recorded in its meta.json is
    moved aside (and then tokenised again): corrupt tokens would train silently."""
    if not tdir.exists():
        return
    try:
        meta = json.loads((tdir / "meta.json").read_text())
        sums = meta.get("sha256")
        ok = sums and all(_file_sha(tdir / f"{s}.bin") == sums[s] for s in ("train", "val"))
    except (OSError, ValueError, KeyError, TypeError):
        sums, ok = True, False
    if not ok:
        why = "is corrupt" if sums else "has no checksums (an older version wrote it)"
        aside = tdir.with_name(f"{tdir.name}.corrupt-{os.getpid()}")
        os.replace(tdir, aside)
        print(f"warning: the token cache {tdir} {why}; moved to {aside}, tokenising again")


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**24), b""):
            h.update(block)
    return h.hexdigest()


def _capped(docs: Iterator[str], limit: int) -> Iterator[str]:
    """The documents until `limit` characters have gone by (a BPE learns its merges from a
    sample; the word counts of the whole Pile would not fit in memory)."""
    seen = 0
    for doc in docs:
        yield doc
        seen += len(doc)
        if seen >= limit:
            return


def _pieces(docs: Iterator[str]) -> Iterator[tuple[str, bool]]:
    """(piece, last piece of its document): documents cut at whitespace into pieces of at most
    PIECE_CHARS characters, so one huge document never costs more than a few pieces' memory."""
    for doc in docs:
        start = 0
        while len(doc) - start > PIECE_CHARS:
            end = start + PIECE_CHARS
            cut = max(doc.rfind("\n", start, end), doc.rfind(" ", start, end))
            cut = cut + 1 if cut > start else end
            yield doc[start:cut], False
            start = cut
        yield doc[start:], True


def _encode(splits: dict, tok: Tokenizer, out: Path) -> None:
    """Streams each split's documents through the tokenizer into `<split>.bin`."""
    docs = {name: _encode_split(splits[split](), tok, out / f"{name}.bin")
            for name, split in (("train", "train"), ("val", "validation"))}  # fmt: skip
    meta = dict(dtype=_token_dtype(tok).name, vocab=tok.get_vocab_size(), docs=docs["train"])
    meta["sha256"] = {name: _file_sha(out / f"{name}.bin") for name in ("train", "val")}
    (out / "meta.json").write_text(json.dumps(meta))


def _token_dtype(tok: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32)


def _encode_split(docs: Iterator[str], tok: Tokenizer, path: Path) -> int:
    """Streams documents through the tokenizer into `path`, a batch of at most
    ENCODE_BATCH_CHARS characters at a time: memory is bounded by the batch, not the corpus.
    Each document ends with the end-of-text id. Returns the number of documents."""
    eos, dtype, n = tok.token_to_id(eos_token(tok)), _token_dtype(tok), 0
    with open(path, "wb") as f:
        batch, size = [], 0
        for piece, last in _pieces(docs):
            batch.append((piece, last))
            size += len(piece)
            n += last
            if size >= ENCODE_BATCH_CHARS:
                _write_ids(f, tok, batch, eos, dtype)
                batch, size = [], 0
        _write_ids(f, tok, batch, eos, dtype)
    return n


def eval_tokens(cfg, tok: Tokenizer) -> np.ndarray:
    """Every document of the user's own files (`data.corpus='files:...'`, held out or not: the
    user named them to be evaluated on), tokenised with `tok` into the cache: a memmap."""
    d = cfg.data
    files = corpora.corpus_files(d.corpus, d.cache_dir)
    fmt = d.get("format", "auto")
    tok_sha = hashlib.sha256(tok.to_str().encode()).hexdigest()
    key = _sha(corpora.fingerprint(d.corpus, files), fmt, tok_sha)
    docs = corpora.all_documents(files, fmt)

    def fill(tmp: Path) -> None:
        if _encode_split(docs(), tok, tmp / "all.bin") == 0:
            raise DataError(f"data '{d.corpus}' holds no text")

    tdir = corpora.atomic_dir(corpora.cache_root(d.cache_dir) / "tokens" / f"eval-{key}", fill)
    return np.memmap(tdir / "all.bin", dtype=_token_dtype(tok), mode="r")


def _write_ids(f, tok: Tokenizer, batch: list[tuple[str, bool]], eos: int, dtype) -> None:
    if not batch:
        return
    encs = tok.encode_batch([piece for piece, _ in batch])
    for enc, (_, last) in zip(encs, batch, strict=True):
        np.asarray(enc.ids + [eos] if last else enc.ids, dtype).tofile(f)


def window_batch(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
    """int32[len(starts), seq_len + 1]: windows of the stream starting at `starts`."""
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    return np.asarray(tokens[idx], dtype=np.int32)


def train_batch(tokens: np.ndarray, seed: int, step: int, batch_size: int, seq_len: int, rows=None):
    """The training batch of `step`: a pure function of (seed, step). int32[B, seq_len + 1].

    rows: the indices of the global batch's rows to read (a process reads only its own); the
    window starts of all B rows are drawn either way, so every process agrees on them.
    """
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, tokens.size - seq_len - 1, size=batch_size, endpoint=False)
    return window_batch(tokens, starts if rows is None else starts[rows], seq_len)


def val_windows(tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int, rows=None):
    """Consecutive non-overlapping windows from the start of the stream, at most `n_batches`
    batches of `batch_size` (`rows`: the rows of each batch to read).

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
        yield window_batch(tokens, starts if rows is None else starts[rows], seq_len)


def tokenize(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text).ids


def detokenize(tok: Tokenizer, ids) -> str:
    return tok.decode([int(i) for i in ids])
