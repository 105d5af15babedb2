"""Corpora, split, tokenizers, token memmaps, batches and metrics of gptjax.data (no JAX needed)."""

import hashlib
import http.server
import json
import math
import os
import threading

import numpy as np
import pytest

from gptjax import data
from gptjax.errors import GptjaxError
from gptjax.tokenizer import ByteTokenizer, load_tokenizer

CODE = "def f(x):\n    return x * 2  # doubled\n\nclass Point:\n    x: int = 0\n"


def synthetic_docs(n: int = 20) -> list[tuple[str, str]]:
    return [(f"doc{i:02d}.py", CODE.replace("f(", f"f{i}(") * (i + 1)) for i in range(n)]


# ---------------------------------------------------------------- corpora


def test_stdlib_corpus_sorted_python_only_and_stable_split():
    docs = data.stdlib_corpus()
    names = [n for n, _ in docs]
    assert len(docs) > 100 and names == sorted(names) and all(n.endswith(".py") for n in names)
    assert all(text for _, text in docs) and "os.py" in names
    parts = [set(n.split("/")) for n in names]
    assert not any(p & {"test", "tests", "site-packages", "__pycache__"} for p in parts)
    train, val = data.split_docs(docs)
    assert len(train) + len(val) == len(docs) and 0 < len(val) < 0.15 * len(docs)
    assert data.split_docs(data.stdlib_corpus()) == (train, val)


def test_local_file_dir_and_glob(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "sub" / "blob.bin").write_bytes(b"\x00\x01binary")
    (tmp_path / "sub" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / ".hidden").write_text("secret")
    assert data.local_corpus(tmp_path / "a.txt") == [("a.txt", "alpha")]
    assert data.local_corpus(tmp_path) == [("a.txt", "alpha"), ("sub/b.md", "beta")]
    got = data.local_corpus(str(tmp_path / "**" / "*.txt"))
    assert [t for _, t in got] == ["alpha"]
    assert data.resolve_corpus(str(tmp_path)) == data.local_corpus(tmp_path)


def test_local_corpus_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(GptjaxError, match=f"data path '{missing}' does not exist.*'tinyshakespeare'"):
        data.local_corpus(missing)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.bin").write_bytes(b"\x00\x00")
    with pytest.raises(GptjaxError, match=r"no text files in data path '.*bin'"):
        data.local_corpus(tmp_path / "bin")
    with pytest.raises(GptjaxError, match=r"no text files in data path '.*\*.zzz'"):
        data.local_corpus(str(tmp_path / "*.zzz"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(GptjaxError, match=r"data path '.*empty': all 1 text file\(s\) are empty"):
        data.local_corpus(tmp_path / "empty")
    with pytest.raises(GptjaxError, match=r"data file '.*x.bin' is not text"):
        data.local_corpus(tmp_path / "bin" / "x.bin")


# ---------------------------------------------------------------- download


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on 127.0.0.1 (free port) serving tmp_path/www; yields (base_url, request_log)."""
    www = tmp_path / "www"
    www.mkdir()
    log: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(www), **k)

        def do_GET(self):
            log.append(self.path)
            super().do_GET()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", www, log
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.integration
def test_download_verifies_caches_and_reports_errors(http_server, tmp_path):
    base, www, log = http_server
    body = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50
    (www / "input.txt").write_text(body)
    sha = hashlib.sha256(body.encode()).hexdigest()
    cache = tmp_path / "cache"
    url = base + "/input.txt"
    with pytest.raises(GptjaxError, match=r"sha256 [0-9a-f]{64}, expected 0{64}; not saved"):
        data.download_corpus("tinyshakespeare", cache, url=url, sha256="0" * 64)
    assert list(cache.iterdir()) == []  # no partial or unverified file left behind
    assert data.download_corpus("tinyshakespeare", cache, url=url, sha256=sha) == [("tinyshakespeare", body)]
    assert data.download_corpus("tinyshakespeare", cache, url=url, sha256=sha) == [("tinyshakespeare", body)]
    assert log == ["/input.txt", "/input.txt"]  # the mismatch and the first good download; then the cache
    assert [p.name for p in cache.iterdir()] == ["tinyshakespeare.txt"]
    with pytest.raises(GptjaxError, match=r"could not download '.*/missing.txt': .*--data PATH"):
        data.download_corpus("tinyshakespeare", tmp_path / "c2", url=base + "/missing.txt", sha256=sha)
    with pytest.raises(GptjaxError, match=r"unknown corpus 'nope'; downloadable corpora: 'tinyshakespeare'"):
        data.download_corpus("nope", cache)


def test_default_download_is_the_known_file():
    url, sha = data.DOWNLOADS["tinyshakespeare"]
    assert url.endswith("/tinyshakespeare/input.txt") and len(sha) == 64


# ---------------------------------------------------------------- split


def test_split_by_document_is_deterministic_and_never_empty():
    docs = synthetic_docs(20)
    train, val = data.split_docs(docs, 0.2)
    assert train and val and sorted(train + val) == sorted(docs)
    assert data.split_docs(list(reversed(docs)), 0.2)[1] == list(reversed(val))  # by name, not position
    for frac in (1e-9, 0.999999):
        tr, va = data.split_docs(docs[:2], frac)
        assert len(tr) == len(va) == 1
    tr, va = data.split_docs([("one", "abcdefghij")], 0.2)
    assert tr == [("one", "abcdefgh")] and va == [("one", "ij")]
    with pytest.raises(GptjaxError, match=r"val_fraction must be in \(0, 1\), got 1.5"):
        data.split_docs(docs, 1.5)


# ---------------------------------------------------------------- tokenizers


def test_byte_and_bpe_tokenizers(tmp_path):
    assert isinstance(data.make_tokenizer("byte", [], tmp_path / "b"), ByteTokenizer)
    texts = [t for _, t in synthetic_docs(10)] + ["héllo wörld ☃"]
    tok = data.make_tokenizer("bpe:300", texts, tmp_path / "run")
    assert 257 < tok.vocab_size <= 300  # at most N: pairs seen once are not merged
    for text in ["def f3(x):\n    return x * 2", "unseen ☃ naïve\n\n"]:
        assert tok.decode(tok.encode(text)) == text
    reloaded = load_tokenizer(tmp_path / "run")
    assert reloaded.encode(CODE) == tok.encode(CODE) and reloaded.vocab_size == tok.vocab_size
    again = data.make_tokenizer("bpe:300", texts, tmp_path / "run2")
    assert (tmp_path / "run2/tokenizer.json").read_text() == (tmp_path / "run/tokenizer.json").read_text()
    from_dir = data.make_tokenizer(str(tmp_path / "run"), [], tmp_path / "run3")
    assert from_dir.encode(CODE) == again.encode(CODE) and (tmp_path / "run3/tokenizer.json").is_file()


@pytest.mark.parametrize("spec", ["bpe:0", "bpe:x", "bpe:256", "bpe:65537", "bpe:", "foo"])
def test_bad_tokenizer_spec(spec, tmp_path):
    with pytest.raises(GptjaxError, match=f"{spec!r}.*'bpe:N'.*N.* in \\[257, 65536\\]"):
        data.make_tokenizer(spec, ["abc"], tmp_path)


# ---------------------------------------------------------------- token memmaps


class CountingByteTokenizer(ByteTokenizer):
    """A byte tokenizer that counts encode calls (goes through the generic, non-fast path)."""

    calls = 0

    def encode(self, text):
        CountingByteTokenizer.calls += 1
        return super().encode(text)


def test_memmap_written_once_reused_and_reencoded_on_change(tmp_path):
    docs = [("a", "hello"), ("b", "wörld")]
    path = tmp_path / "train.bin"
    tok = CountingByteTokenizer()
    tokens = data.encode_to_memmap(docs, tok, path)
    assert tokens.dtype == np.uint16 and not tokens.flags.writeable
    assert bytes(tokens.astype(np.uint8)) == "hello\n\nwörld".encode()
    meta = json.loads((tmp_path / "train.bin.json").read_text())
    assert meta["n_tokens"] == len(tokens) == meta["n_bytes"] == 13 and meta["dtype"] == "uint16"
    calls, mtime = tok.calls, path.stat().st_mtime_ns
    again = data.encode_to_memmap(docs, tok, path)
    assert tok.calls == calls and path.stat().st_mtime_ns == mtime and np.array_equal(again, tokens)
    changed = data.encode_to_memmap([("a", "hello"), ("b", "world")], tok, path)
    assert tok.calls > calls and bytes(changed.astype(np.uint8)) == b"hello\n\nworld"
    assert np.array_equal(data.load_tokens(path), changed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.bin", "train.bin.json"]  # no temp files


def test_memmap_reencodes_for_another_tokenizer(tmp_path):
    docs = synthetic_docs(5)
    byte = data.encode_to_memmap(docs, ByteTokenizer(), tmp_path / "t.bin")
    bpe_tok = data.make_tokenizer("bpe:400", [t for _, t in docs], tmp_path)
    bpe = data.encode_to_memmap(docs, bpe_tok, tmp_path / "t.bin")
    assert len(bpe) < len(byte) and bpe_tok.decode(bpe.tolist()) == "\n\n".join(t for _, t in docs)
    assert data.token_dtype(50257) == np.uint16 and data.token_dtype(65537) == np.uint32
    with pytest.raises(GptjaxError, match="no token metadata"):
        data.load_tokens(tmp_path / "other.bin")


# ---------------------------------------------------------------- batches


def test_batcher_is_seeded_and_resumes_exactly():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = data.Batcher(tokens, 4, 8, seed=3), data.Batcher(tokens, 4, 8, seed=3)
    x, y = next(a)
    assert x.shape == y.shape == (4, 8) and x.dtype == np.int32
    assert np.array_equal(x[:, 1:], y[:, :-1]) and np.all(y == x + 1)  # targets are inputs shifted by one
    assert np.array_equal(next(b)[0], x)
    for _ in range(3):
        next(a)
    state = json.loads(json.dumps(a.get_state()))
    expected = [next(a) for _ in range(5)]
    resumed = data.Batcher(tokens, 4, 8, seed=99)
    resumed.set_state(state)
    assert resumed.batches_drawn == 4
    for (ex, ey), (rx, ry) in zip(expected, [next(resumed) for _ in range(5)]):
        assert np.array_equal(ex, rx) and np.array_equal(ey, ry)
    assert not np.array_equal(next(data.Batcher(tokens, 4, 8, seed=4))[0], x)
    with pytest.raises(GptjaxError, match="not a Batcher state"):
        resumed.set_state({"batches_drawn": 1})


def test_batcher_shards_rows_of_the_global_batch():
    tokens = np.arange(500, dtype=np.uint16)
    full = next(data.Batcher(tokens, 6, 5, seed=1))[0]
    parts = [next(data.Batcher(tokens, 6, 5, seed=1, process_index=i, process_count=3))[0] for i in range(3)]
    assert all(p.shape == (2, 5) for p in parts) and np.array_equal(np.concatenate(parts), full)
    with pytest.raises(GptjaxError, match="batch size 6 is not divisible by process_count 4"):
        data.Batcher(tokens, 6, 5, process_count=4)
    with pytest.raises(GptjaxError, match=r"process_index must be in \[0, 2\).*got 2 of 2"):
        data.shard(full, 2, 2)


def test_corpus_shorter_than_a_window():
    with pytest.raises(GptjaxError, match=r"corpus has 8 tokens, shorter than one context window of T\+1 = 9"):
        data.Batcher(np.arange(8), 2, 8)
    with pytest.raises(GptjaxError, match=r"corpus has 8 tokens.*T\+1 = 9"):
        list(data.eval_batches(np.arange(8), 2, 8))
    assert len(next(data.Batcher(np.arange(9), 2, 8))[0][0]) == 8  # exactly one window fits


def test_eval_batches_tile_and_repeat():
    tokens = np.arange(101, dtype=np.uint16)
    batches = list(data.eval_batches(tokens, 3, 10))
    assert len(batches) == 3  # 10 windows → 3 full batches of 3 (the 10th window is dropped)
    targets = np.concatenate([y for _, y in batches]).ravel()
    assert np.array_equal(targets, np.arange(1, 91))  # every token a target at most once, in order
    again = list(data.eval_batches(tokens, 3, 10))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(batches, again))
    assert len(list(data.eval_batches(tokens, 3, 10, max_batches=2))) == 2
    (x, y), = data.eval_batches(tokens, 32, 10)  # fewer windows than B: one smaller batch
    assert x.shape == (10, 10)


# ---------------------------------------------------------------- metrics


def test_validation_tokens_join_documents_as_training_does_and_windows_tile_them(tmp_path):
    for name, text in synthetic_docs(5):
        (tmp_path / name).write_text(text)
    _, val_docs = data.split_docs(data.local_corpus(tmp_path), 0.4)
    tokens, docs = data.validation_tokens(str(tmp_path), ByteTokenizer(), 0.4, 256)
    assert docs == val_docs
    assert bytes(tokens.tolist()).decode() == data.SEPARATOR.join(text for _, text in val_docs)
    with pytest.raises(GptjaxError, match="produced id .* >= the model's vocab_size 100"):
        data.validation_tokens(str(tmp_path), ByteTokenizer(), 0.4, 100)
    windows = data.eval_windows(tokens, 16, 5)  # [N, T+1]: inputs plus the last target
    x, y = next(data.eval_batches(tokens, 8, 16))
    assert windows.shape == (5, 17) and np.array_equal(windows[:, :-1], x[:5]) and np.array_equal(windows[:, 1:], y[:5])


def test_bits_per_byte_and_unigram_entropy():
    # 100 tokens at ln 2 nats each over 200 bytes: 100 bits / 200 bytes = 0.5 bits per byte.
    assert data.bits_per_byte(math.log(2), 100, 200) == pytest.approx(0.5)
    assert data.bits_per_byte(2.0, 10, 10) == pytest.approx(2.0 / math.log(2))
    with pytest.raises(GptjaxError, match="n_bytes > 0.*got 0"):
        data.bits_per_byte(1.0, 10, 0)
    assert data.unigram_entropy(np.array([0, 1, 2, 3] * 5, np.uint16)) == pytest.approx(math.log(4))
    assert data.unigram_entropy(np.array([7, 7, 7])) == pytest.approx(0.0)
    assert data.corpus_bytes([("a", "hé"), ("b", "x")]) == 3 + 2 + 1


def test_no_temp_files_left_by_atomic_writes(tmp_path):
    data.encode_to_memmap([("a", "x" * 50)], ByteTokenizer(), tmp_path / "v.bin")
    assert not [p for p in os.listdir(tmp_path) if p.endswith((".tmp", ".part"))]
