"""Corpora as documents: the running Python's standard library, local text (a file, a directory, a glob), a
downloaded corpus checked by sha256, and the split of a corpus into training and validation documents.

A document is a `(name, text)` pair. Documents are joined with the tokenizer's own encoding of SEPARATOR
(each document is encoded on its own, then the separator ids go between, see gptjax.data.tokens), so no
special token is needed and byte and BPE vocabularies work alike.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import sysconfig
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from gptjax.errors import GptjaxError

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
