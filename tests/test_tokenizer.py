"""Byte tokenizer and GPT-2-style BPE read from local files in both layouts."""

import pytest
from tokenizers import ByteLevelBPETokenizer

from gptjax import ByteTokenizer, GptjaxError, load_tokenizer
from gptjax.tokenizer import checkpoint_tokenizer, has_tokenizer

TEXT = ["def f(x):\n    return x * 2  # doubled\n", "héllo wörld, naïve café", "the quick brown fox"] * 20


def test_byte_tokenizer_round_trip_and_errors():
    tok = ByteTokenizer()
    ids = tok.encode("héllo\n")
    assert ids == list("héllo\n".encode()) and tok.vocab_size == 256
    assert tok.decode(ids) == "héllo\n"
    assert tok.decode(ids[:2]) == "h\ufffd"  # half a character decodes to U+FFFD, never raises
    with pytest.raises(GptjaxError, match=r"id\(s\) \[256\] outside \[0, 256\)"):
        tok.decode([1, 256])


@pytest.fixture
def bpe_dirs(tmp_path):
    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(TEXT, vocab_size=300, min_frequency=1, show_progress=False)
    json_dir, files_dir = tmp_path / "json", tmp_path / "files"
    json_dir.mkdir()
    files_dir.mkdir()
    trained.save(str(json_dir / "tokenizer.json"))
    trained.save_model(str(files_dir))  # vocab.json + merges.txt, as GPT-2 ships them
    return trained, json_dir, files_dir


def test_bpe_from_tokenizer_json_and_from_vocab_merges_agree(bpe_dirs):
    trained, json_dir, files_dir = bpe_dirs
    a, b = load_tokenizer(json_dir), load_tokenizer(files_dir)
    assert has_tokenizer(json_dir) and has_tokenizer(files_dir)
    for text in ["def f(x): return café", " leading space", "unseen ☃ symbol"]:
        ids = a.encode(text)
        assert ids == b.encode(text) == trained.encode(text).ids
        assert a.decode(ids) == b.decode(ids) == text
    assert a.vocab_size == b.vocab_size == 300
    assert len(a.encode("the quick brown fox")) < len(ByteTokenizer().encode("the quick brown fox"))


def test_missing_or_corrupt_tokenizer_files(tmp_path):
    assert not has_tokenizer(tmp_path)
    with pytest.raises(GptjaxError, match="expected tokenizer.json, or vocab.json \\+ merges.txt"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(GptjaxError, match="not a valid tokenizers file"):
        load_tokenizer(tmp_path)


def test_checkpoint_tokenizer_prefers_files_then_bytes(bpe_dirs, tmp_path):
    assert checkpoint_tokenizer(tmp_path, 300) is None  # no files, not a byte vocabulary: ids only
    assert isinstance(checkpoint_tokenizer(tmp_path, 256), ByteTokenizer)
    assert checkpoint_tokenizer(bpe_dirs[1], 256).vocab_size == 300  # the files win over the byte fallback
