"""Tokens: the tokenizer a run reads (bytes, a byte-level BPE trained on the training split, or a checkpoint's
files), and a corpus encoded once into a memory-mapped uint16/uint32 token file with a JSON sidecar, reused while
the documents and the tokenizer are unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from gptjax.data.corpora import SEPARATOR, Doc, resolve_corpus, split_docs
from gptjax.errors import GptjaxError, read_json
from gptjax.tokenizer import (
    CHAR_ESCAPES,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    has_tokenizer,
    load_tokenizer,
)

BPE_MIN, BPE_MAX = 257, 65536  # one merge at least; ids fit uint16
CHAR_MIN = CHAR_ESCAPES + 1  # one character at least, beside the escape and the nibbles
BPE_TRAIN_CAP_BYTES = 100_000_000  # BPE trains on the leading docs up to this size (stdlib: all ~10 MB, ~1 s)
TOKENS_FORMAT = 1


def _spec_size(spec: str, smallest: int) -> int:
    """N from 'bpe:N' or 'char:N', checked against [smallest, BPE_MAX]."""
    kind, _, text = spec.partition(":")
    n = int(text) if text.isdigit() else None
    if n is None or not smallest <= n <= BPE_MAX:
        raise GptjaxError(f"tokenizer {spec!r}: '{kind}:N' needs an integer N in [{smallest}, {BPE_MAX}]")
    return n


def _cap_texts(texts: Sequence[str], cap_bytes: int) -> list[str]:
    """The leading texts whose UTF-8 sizes add up to at most cap_bytes (always at least one)."""
    out, total = [], 0
    for t in texts:
        total += len(t.encode("utf-8"))
        if out and total > cap_bytes:
            break
        out.append(t)
    return out


def train_bpe(texts: Sequence[str], vocab_size: int, cap_bytes: int = BPE_TRAIN_CAP_BYTES) -> BPETokenizer:
    """A GPT-2-style byte-level BPE of at most vocab_size ids (fewer when merges run out) trained on texts
    (the leading ones, up to cap_bytes)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(_cap_texts(texts, cap_bytes), trainer=trainer)
    return BPETokenizer(tok)


def train_chars(texts: Sequence[str], vocab_size: int, cap_bytes: int = BPE_TRAIN_CAP_BYTES) -> CharTokenizer:
    """A char:N vocabulary: the vocab_size - 17 most frequent characters of texts (the leading ones, up to
    cap_bytes; ties broken by the character), the rest escaped byte by byte."""
    counts = Counter(c for t in _cap_texts(texts, cap_bytes) for c in t)
    chars = sorted(counts, key=lambda c: (-counts[c], c))[:vocab_size - CHAR_ESCAPES]
    return CharTokenizer("".join(chars) or " ", vocab_size)


def make_tokenizer(spec: str, train_texts: Sequence[str], out_dir: str | os.PathLike) -> Tokenizer:
    """'byte' → ByteTokenizer; 'bpe:N' → BPE trained on train_texts; 'char:N' → the N - 17 most frequent
    characters of train_texts and escapes; a directory → its tokenizer files. All but bytes are saved as
    out_dir/tokenizer.json (gptjax.tokenizer.load_tokenizer reads it)."""
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("bpe:"):
        tok = train_bpe(train_texts, _spec_size(spec, BPE_MIN))
    elif spec.startswith("char:"):
        tok = train_chars(train_texts, _spec_size(spec, CHAR_MIN))
    elif os.path.isdir(spec) and has_tokenizer(spec):
        tok = load_tokenizer(spec)
    else:
        raise GptjaxError(f"unknown tokenizer {spec!r}; expected 'byte', 'bpe:N' with N in [{BPE_MIN}, {BPE_MAX}], "
                          f"'char:N' with N in [{CHAR_MIN}, {BPE_MAX}], or a directory holding tokenizer.json or "
                          "vocab.json + merges.txt")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(out_dir) / "tokenizer.json", tok.to_json().encode("utf-8"))
    return tok


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A string that changes whenever the tokenizer's mapping does (its tokenizer.json; none for bytes)."""
    to_json = getattr(tokenizer, "to_json", None)  # BPE and char tokenizers; bytes have no file
    body = to_json() if to_json is not None else ""
    return f"{type(tokenizer).__name__}:{tokenizer.vocab_size}:{hashlib.sha256(body.encode()).hexdigest()}"


# ---------------------------------------------------------------- tokens on disk


def corpus_hash(docs: Sequence[Doc], tokenizer: Tokenizer) -> str:
    """sha256 over the documents' names and texts, the separator and the tokenizer fingerprint."""
    h = hashlib.sha256(f"gptjax-tokens-v{TOKENS_FORMAT}\0{SEPARATOR}\0{tokenizer_fingerprint(tokenizer)}\0".encode())
    for name, text in docs:
        for part in (name, text):
            b = part.encode("utf-8")
            h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


def corpus_bytes(docs: Sequence[Doc]) -> int:
    """UTF-8 bytes of the documents joined by SEPARATOR: the text the encoded tokens stand for."""
    return sum(len(t.encode("utf-8")) for _, t in docs) + len(SEPARATOR.encode()) * max(len(docs) - 1, 0)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab ≤ 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file that appears at path, complete, only if the block ends without an error (a temp file in the same
    directory, renamed; a failed write leaves neither a partial file nor the temp file, and its OSError names path)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:  # a write to the open file (a full disk) names no file: name the one being written
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to path atomically (atomic_file)."""
    with atomic_file(path) as f:
        f.write(data)


def _encode(tokenizer: Tokenizer, text: str, dtype: np.dtype) -> np.ndarray:
    """One document's ids as an array (bytes are viewed directly for the byte tokenizer)."""
    if type(tokenizer) is ByteTokenizer:  # exact type: a subclass may encode differently
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(dtype)
    return np.asarray(tokenizer.encode(text), dtype)


def _sidecar(path: Path) -> Path:
    """The JSON metadata file next to a token file."""
    return path.with_name(path.name + ".json")


def read_token_meta(path: str | os.PathLike) -> dict:
    """The sidecar of a token file: source_hash, dtype, n_tokens, n_bytes, n_docs, vocab_size."""
    side = _sidecar(Path(path))
    if not side.is_file():
        raise GptjaxError(f"no token metadata {str(side)!r}; encode the corpus with encode_to_memmap first")
    return read_json(side)


def _is_current(path: Path, source_hash: str) -> bool:
    """Whether path holds the tokens of source_hash, complete."""
    try:
        meta = read_token_meta(path)
        return (meta.get("source_hash") == source_hash and path.is_file()
                and path.stat().st_size == meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize)
    except (GptjaxError, ValueError, KeyError, TypeError):
        return False


def encode_to_memmap(docs: Sequence[Doc], tokenizer: Tokenizer, path: str | os.PathLike,
                     source_hash: str | None = None) -> np.memmap:
    """Encode docs once into a uint16/uint32 token file (atomic) + JSON sidecar; reused while the hash matches."""
    path = Path(path)
    source_hash = source_hash or corpus_hash(docs, tokenizer)
    if _is_current(path, source_hash):
        return load_tokens(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    sep = _encode(tokenizer, SEPARATOR, dtype)
    n = 0
    with atomic_file(path) as f:
        for i, (_, text) in enumerate(docs):
            ids = _encode(tokenizer, text, dtype) if i == 0 else np.concatenate([sep, _encode(tokenizer, text, dtype)])
            f.write(ids.tobytes())
            n += ids.size
    meta = {"format": TOKENS_FORMAT, "source_hash": source_hash, "dtype": dtype.name, "n_tokens": n,
            "n_bytes": corpus_bytes(docs), "n_docs": len(docs), "vocab_size": tokenizer.vocab_size}
    write_atomic(_sidecar(path), json.dumps(meta, indent=1).encode())
    return load_tokens(path)


def load_tokens(path: str | os.PathLike) -> np.memmap:
    """A token file as a read-only 1-D memmap, dtype from its sidecar."""
    meta = read_token_meta(path)
    if meta["n_tokens"] == 0:
        return np.zeros(0, meta["dtype"])  # mmap cannot map an empty file
    return np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))


# ---------------------------------------------------------------- a run's data


@dataclass
class RunData:
    """What a training run reads: its tokenizer, the token files of both splits, the validation text's bytes."""

    tokenizer: Tokenizer
    train: np.ndarray  # token ids, a memmap
    val: np.ndarray
    val_bytes: int  # UTF-8 bytes the validation tokens stand for (for bits per byte)


def prepare_run_data(spec: str | None, val_fraction: float, out: Path, tokenizer_spec: str) -> RunData:
    """Corpus `spec` → split → tokenizer → token files in the run directory `out` (data/train.bin, data/val.bin,
    re-encoded only when the source changes)."""
    train_docs, val_docs = split_docs(resolve_corpus(spec), val_fraction)
    tokenizer = make_tokenizer(tokenizer_spec, [t for _, t in train_docs], out)
    train = encode_to_memmap(train_docs, tokenizer, out / "data" / "train.bin")
    val = encode_to_memmap(val_docs, tokenizer, out / "data" / "val.bin")
    return RunData(tokenizer, train, val, corpus_bytes(val_docs))
