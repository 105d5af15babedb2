"""Training data: corpora (the running Python's stdlib, local text, a downloaded corpus), a split by document,
tokenizers (byte or a freshly trained byte-level BPE), tokens encoded once into a memory-mapped file, and
seeded random batches whose generator state can be checkpointed.

A document is a `(name, text)` pair. Documents are joined with the tokenizer's own encoding of "\\n\\n"
(each document is encoded on its own, then the separator ids go between), so no special token is needed
and byte and BPE vocabularies work alike.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
import sysconfig
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from gptjax.errors import GptjaxError
from gptjax.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, has_tokenizer, load_tokenizer

Doc = tuple[str, str]

SEPARATOR = "\n\n"
# Skipped in the stdlib corpus: installed packages, test suites, bytecode caches, and generated data that is
# not code people write (charmap codec tables in `encodings`, pydoc's help text in `pydoc_data`).
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                              "encodings", "pydoc_data"})
STDLIB_SKIP_PREFIXES = ("_sysconfigdata_",)  # build flags of the machine Python was compiled on
DOWNLOADS = {
    "tinyshakespeare": (
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",  # 1,115,394 bytes
    ),
}
BPE_MIN, BPE_MAX = 257, 65536  # one merge at least; ids fit uint16
BPE_TRAIN_CAP_BYTES = 100_000_000  # BPE trains on the leading docs up to this size (stdlib: all ~10 MB, ~1 s)
TOKENS_FORMAT = 1


# ---------------------------------------------------------------- corpora


def _read_text(path: Path) -> str | None:
    """A file's text, or None when it is binary (holds a NUL byte or is not valid UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _stdlib_files(root: Path) -> list[Path]:
    """The `.py` files under root, minus STDLIB_SKIP_DIRS / STDLIB_SKIP_PREFIXES, sorted by relative path."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
        files += [Path(dirpath, f) for f in filenames
                  if f.endswith(".py") and not f.startswith(STDLIB_SKIP_PREFIXES)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_corpus(root: str | os.PathLike | None = None) -> list[Doc]:
    """The running interpreter's standard library `.py` files (depends on the Python version), sorted."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    docs = [(p.relative_to(base).as_posix(), _read_text(p)) for p in _stdlib_files(base)]
    docs = [(name, text) for name, text in docs if text]
    if not docs:
        raise GptjaxError(f"no UTF-8 .py files in the standard library directory {str(base)!r}")
    return docs


def _text_docs(paths: Sequence[Path], name: Callable[[Path], str]) -> tuple[list[Doc], int]:
    """(name, text) of the non-binary, non-empty files, sorted by name; also how many were text."""
    texts = [(name(p), _read_text(p)) for p in paths]
    texts = [(n, t) for n, t in texts if t is not None]
    return sorted((n, t) for n, t in texts if t), len(texts)


def local_corpus(path: str | os.PathLike) -> list[Doc]:
    """A text file, a directory of text files (recursive, hidden entries and binary files skipped), or a glob."""
    spec = str(path)
    p = Path(spec).expanduser()
    if p.is_file():
        text = _read_text(p)
        if text is None:
            raise GptjaxError(f"data file {spec!r} is not text (it holds NUL bytes or invalid UTF-8)")
        docs, n_text = ([(p.name, text)] if text else []), 1
    elif p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file()
                 and not any(part.startswith(".") for part in f.relative_to(p).parts)]
        docs, n_text = _text_docs(files, lambda f: f.relative_to(p).as_posix())
    elif glob.has_magic(spec):
        files = [Path(f) for f in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(f)]
        docs, n_text = _text_docs(files, lambda f: f.as_posix())
    else:
        raise GptjaxError(f"data path {spec!r} does not exist; expected a text file, a directory of text "
                          "files, a glob pattern, 'stdlib' or one of " + ", ".join(map(repr, DOWNLOADS)))
    if n_text == 0:
        raise GptjaxError(f"no text files in data path {spec!r} (binary files are skipped)")
    if not docs:
        raise GptjaxError(f"data path {spec!r}: all {n_text} text file(s) are empty")
    return docs


def default_cache_dir() -> Path:
    """Where downloads are kept: $GPTJAX_CACHE, else $XDG_CACHE_HOME/gptjax, else ~/.cache/gptjax."""
    if os.environ.get("GPTJAX_CACHE"):
        return Path(os.environ["GPTJAX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptjax"


def _sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dest: Path, sha256: str, timeout: float) -> None:
    """Download url into dest atomically (temp file + rename), only if its sha256 matches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
            shutil.copyfileobj(r, f)
        got = _sha256_file(Path(tmp))
        if got != sha256:
            raise GptjaxError(f"download of {url!r} has sha256 {got}, expected {sha256}; not saved")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as e:
        raise GptjaxError(f"could not download {url!r}: {getattr(e, 'reason', e)}; pass a local file "
                          "with --data PATH instead") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def download_corpus(name: str, cache_dir: str | os.PathLike | None = None, url: str | None = None,
                    sha256: str | None = None, timeout: float = 60.0) -> list[Doc]:
    """A known corpus by name, downloaded once into cache_dir and verified by sha256 (url/sha256 override)."""
    if name not in DOWNLOADS:
        raise GptjaxError(f"unknown corpus {name!r}; downloadable corpora: {', '.join(map(repr, DOWNLOADS))}")
    url, sha256 = url or DOWNLOADS[name][0], (sha256 or DOWNLOADS[name][1]).lower()
    dest = Path(cache_dir or default_cache_dir()) / f"{name}.txt"
    if not (dest.is_file() and _sha256_file(dest) == sha256):
        _fetch(url, dest, sha256, timeout)
    return [(name, dest.read_text(encoding="utf-8"))]


def resolve_corpus(spec: str | None, cache_dir: str | os.PathLike | None = None) -> list[Doc]:
    """None/'stdlib' → stdlib_corpus, a DOWNLOADS name → download_corpus, anything else → local_corpus."""
    if spec is None or spec == "stdlib":
        return stdlib_corpus()
    if spec in DOWNLOADS:
        return download_corpus(spec, cache_dir)
    return local_corpus(spec)


# ---------------------------------------------------------------- split


def _unit_hash(name: str) -> float:
    """A stable number in [0, 1) from a document name (sha256, independent of PYTHONHASHSEED)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_docs(docs: Sequence[Doc], val_fraction: float = 0.05) -> tuple[list[Doc], list[Doc]]:
    """(train, val) by document: a doc is in val when the hash of its name < val_fraction; one doc: its tail."""
    if not 0.0 < val_fraction < 1.0:
        raise GptjaxError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if not docs:
        raise GptjaxError("cannot split an empty corpus (0 documents)")
    if len(docs) == 1:
        name, text = docs[0]
        cut = min(max(round(len(text) * (1 - val_fraction)), 1), max(len(text) - 1, 1))
        return [(name, text[:cut])], [(name, text[cut:])]
    order = sorted(range(len(docs)), key=lambda i: (_unit_hash(docs[i][0]), i))
    n_val = sum(_unit_hash(name) < val_fraction for name, _ in docs)
    val_ids = set(order[:min(max(n_val, 1), len(docs) - 1)])  # at least one doc on each side
    return ([d for i, d in enumerate(docs) if i not in val_ids], [d for i, d in enumerate(docs) if i in val_ids])


# ---------------------------------------------------------------- tokenizers


def _bpe_size(spec: str) -> int:
    """N from 'bpe:N', checked against [BPE_MIN, BPE_MAX]."""
    try:
        n = int(spec.split(":", 1)[1])
    except ValueError:
        n = None
    if n is None or not BPE_MIN <= n <= BPE_MAX:
        raise GptjaxError(f"tokenizer {spec!r}: 'bpe:N' needs an integer N in [{BPE_MIN}, {BPE_MAX}]")
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


def make_tokenizer(spec: str, train_texts: Sequence[str], out_dir: str | os.PathLike) -> Tokenizer:
    """'byte' → ByteTokenizer; 'bpe:N' → BPE trained on train_texts; a directory → its tokenizer files.
    BPE and directory tokenizers are saved as out_dir/tokenizer.json (gptjax.tokenizer.load_tokenizer reads it)."""
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("bpe:"):
        tok = train_bpe(train_texts, _bpe_size(spec))
    elif os.path.isdir(spec) and has_tokenizer(spec):
        tok = load_tokenizer(spec)
    else:
        raise GptjaxError(f"unknown tokenizer {spec!r}; expected 'byte', 'bpe:N' with N in "
                          f"[{BPE_MIN}, {BPE_MAX}], or a directory holding tokenizer.json or vocab.json + merges.txt")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    _write_atomic(Path(out_dir) / "tokenizer.json", tok._tok.to_str().encode("utf-8"))
    return tok


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A string that changes whenever the tokenizer's mapping does (its tokenizer.json for BPE)."""
    inner = getattr(tokenizer, "_tok", None)  # BPETokenizer wraps a tokenizers.Tokenizer
    body = inner.to_str() if inner is not None else ""
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


def _write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to path via a temp file in the same directory and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


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
    return json.loads(side.read_text())


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    n = 0
    with os.fdopen(fd, "wb") as f:
        for i, (_, text) in enumerate(docs):
            ids = _encode(tokenizer, text, dtype) if i == 0 else np.concatenate([sep, _encode(tokenizer, text, dtype)])
            f.write(ids.tobytes())
            n += ids.size
    os.replace(tmp, path)
    meta = {"format": TOKENS_FORMAT, "source_hash": source_hash, "dtype": dtype.name, "n_tokens": n,
            "n_bytes": corpus_bytes(docs), "n_docs": len(docs), "vocab_size": tokenizer.vocab_size}
    _write_atomic(_sidecar(path), json.dumps(meta, indent=1).encode())
    return load_tokens(path)


def load_tokens(path: str | os.PathLike) -> np.memmap:
    """A token file as a read-only 1-D memmap, dtype from its sidecar."""
    meta = read_token_meta(path)
    if meta["n_tokens"] == 0:
        return np.zeros(0, meta["dtype"])  # mmap cannot map an empty file
    return np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))


# ---------------------------------------------------------------- batches


def _check_window(n_tokens: int, T: int) -> None:
    """Raise unless a context window of T+1 tokens fits in n_tokens."""
    if T < 1:
        raise GptjaxError(f"context length T must be >= 1, got {T}")
    if n_tokens < T + 1:
        raise GptjaxError(f"corpus has {n_tokens} tokens, shorter than one context window of T+1 = {T + 1} "
                          "tokens; use more text or a smaller context length")


def shard(batch: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """Rows [i*B/n, (i+1)*B/n) of a global [B, ...] batch: process i's share under data parallelism."""
    B = batch.shape[0]
    if process_count < 1 or not 0 <= process_index < process_count:
        raise GptjaxError(f"process_index must be in [0, {process_count}) with process_count >= 1, "
                          f"got {process_index} of {process_count}")
    if B % process_count:
        raise GptjaxError(f"batch size {B} is not divisible by process_count {process_count}")
    rows = B // process_count
    return batch[process_index * rows:(process_index + 1) * rows]


class Batcher:
    """Random windows [B, T+1] from a token array with a seeded PCG64; inputs [:, :-1], targets [:, 1:].

    Every process draws the same global batch and keeps its shard, so the generator state is the same
    everywhere and get_state()/set_state() resume the exact sequence of batches.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, context: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1) -> None:
        _check_window(len(tokens), context)
        if batch_size < 1:
            raise GptjaxError(f"batch size must be >= 1, got {batch_size}")
        shard(np.empty((batch_size, 0)), process_index, process_count)  # validates the sharding up front
        self.tokens, self.B, self.T = tokens, batch_size, context
        self.process_index, self.process_count = process_index, process_count
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.batches_drawn = 0

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        """This process's (inputs, targets), each int32 [B/n, T]."""
        starts = self.rng.integers(0, len(self.tokens) - self.T, size=self.B)  # [B]
        windows = np.asarray(self.tokens[starts[:, None] + np.arange(self.T + 1)], np.int32)  # [B, T+1]
        windows = shard(windows, self.process_index, self.process_count)  # [B/n, T+1]
        self.batches_drawn += 1
        return windows[:, :-1], windows[:, 1:]

    def get_state(self) -> dict:
        """JSON-able generator state (big integers as strings, so any JSON reader keeps them exact)."""
        return {"bit_generator": json.dumps(self.rng.bit_generator.state), "batches_drawn": self.batches_drawn}

    def set_state(self, state: dict) -> None:
        """Restore a get_state() dict: the next batches are exactly those that followed it."""
        try:
            bg = json.loads(state["bit_generator"])
            self.rng.bit_generator.state = bg
            self.batches_drawn = int(state["batches_drawn"])
        except (KeyError, TypeError, ValueError) as e:
            raise GptjaxError(f"not a Batcher state (expected keys 'bit_generator', 'batches_drawn' of a "
                              f"PCG64 generator): {e}") from None


def eval_batches(tokens: np.ndarray, batch_size: int, context: int,
                 max_batches: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Fixed (inputs, targets) batches tiling tokens with windows at stride T (each token a target once).
    Only full [B, T] batches, except one smaller batch when fewer than B windows exist."""
    _check_window(len(tokens), context)
    if batch_size < 1:
        raise GptjaxError(f"batch size must be >= 1, got {batch_size}")
    T, n_windows = context, (len(tokens) - 1) // context
    n_batches = max(n_windows // batch_size, 1)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        starts = np.arange(b * batch_size, min((b + 1) * batch_size, n_windows)) * T  # [B]
        windows = np.asarray(tokens[starts[:, None] + np.arange(T + 1)], np.int32)  # [B, T+1]
        yield windows[:, :-1], windows[:, 1:]


def validation_tokens(spec: str | None, tokenizer: Tokenizer, val_fraction: float, vocab_size: int
                      ) -> tuple[np.ndarray, list[Doc]]:
    """The validation split of corpus `spec` (as resolve_corpus reads it, split as training splits it),
    tokenised and joined as training joins documents, and its documents; a GptjaxError when the tokenizer
    yields ids outside the model's vocabulary."""
    _, val_docs = split_docs(resolve_corpus(spec), val_fraction)
    separator = tokenizer.encode(SEPARATOR)
    tokens = np.asarray([i for n, (_, text) in enumerate(val_docs) for i in (separator if n else []) +
                         tokenizer.encode(text)], np.int64)
    if tokens.max(initial=0) >= vocab_size:
        raise GptjaxError(f"the tokenizer produced id {tokens.max()} >= the model's vocab_size {vocab_size}")
    return tokens, val_docs


def eval_windows(tokens: np.ndarray, context: int, count: int) -> np.ndarray:
    """The first `count` windows of context + 1 tokens that eval_batches tiles (inputs plus the last target),
    int32 [N, T+1]."""
    batches = list(eval_batches(tokens, 8, context, -(-count // 8)))
    if not batches:
        raise GptjaxError(f"the validation split has fewer than {context + 1} tokens")
    return np.concatenate([np.concatenate([x, y[:, -1:]], 1) for x, y in batches])[:count]


# ---------------------------------------------------------------- metrics


def bits_per_byte(loss_nats_per_token: float, n_tokens: int, n_bytes: int) -> float:
    """Tokenizer-independent loss: nats/token × tokens / (bytes × ln 2)."""
    if n_bytes <= 0 or n_tokens < 0:
        raise GptjaxError(f"bits_per_byte needs n_bytes > 0 and n_tokens >= 0, got {n_bytes} and {n_tokens}")
    return loss_nats_per_token * n_tokens / (n_bytes * math.log(2))


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats/token) of the token frequencies: the loss of a model that ignores context."""
    if len(tokens) == 0:
        raise GptjaxError("unigram entropy of an empty token array is undefined")
    p = np.bincount(np.asarray(tokens)) / len(tokens)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())
