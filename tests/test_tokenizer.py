"""Byte tokenizer and GPT-2-style BPE read from local files in both layouts."""

import numpy as np
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


# ---- char:N: a vocabulary smaller than bytes, lossless through escapes --------------------------------------
def test_char_vocabulary_keeps_the_most_frequent_characters_and_escapes_the_rest(tmp_path):
    from gptjax.data.tokens import make_tokenizer, tokenizer_fingerprint
    from gptjax.tokenizer import CharTokenizer, checkpoint_tokenizer, load_tokenizer

    tok = make_tokenizer("char:20", ["aaaa bbb cc d"], tmp_path)
    assert isinstance(tok, CharTokenizer) and tok.vocab_size == 20 and tok.chars == "a b"  # 20 - 17 = 3 kept
    assert tok.encode("ab") == [0, 2] and tok.escape == 3
    assert tok.encode("c") == [3, 4 + 6, 4 + 3]  # 'c' = 0x63: ESC, nibble 6, nibble 3
    assert tok.encode("é") == [3, 4 + 0xC, 4 + 3, 3, 4 + 0xA, 4 + 9]  # U+00E9 = C3 A9 in UTF-8
    rng = np.random.default_rng(0)
    text = "".join(chr(c) for c in rng.integers(1, 0x2FFF, 500)) + "a b\n\u00e9\U0001f600"
    assert tok.decode(tok.encode(text)) == text  # every text round-trips
    assert max(tok.encode(text)) < 20
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, CharTokenizer) and loaded.chars == tok.chars and loaded.vocab_size == 20
    assert isinstance(checkpoint_tokenizer(tmp_path, 20), CharTokenizer)
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok) != tokenizer_fingerprint(
        make_tokenizer("char:21", ["aaaa bbb cc d"], tmp_path / "other"))


def test_char_decoding_shows_stray_escapes_as_replacement_and_refuses_bad_ids():
    from gptjax.tokenizer import CharTokenizer

    tok = CharTokenizer("ab", 19)  # ids: a 0, b 1, ESC 2, nibbles 3..18
    assert tok.decode([0, 2, 1]) == "a\ufffdb"  # an escape not followed by two nibbles
    assert tok.decode([5]) == "\ufffd"  # a nibble alone
    assert tok.decode([2, 3 + 0xC, 3 + 3]) == "\ufffd"  # half a character (C3 without its second byte)
    with pytest.raises(GptjaxError, match=r"id\(s\) \[19\] outside \[0, 19\)"):
        tok.decode([19])
    with pytest.raises(GptjaxError, match="must fit vocab_size 18 - 17"):
        CharTokenizer("ab", 18)


def test_char_spec_is_checked():
    from gptjax.data.tokens import make_tokenizer

    for spec in ("char:17", "char:x", "char:70000"):
        with pytest.raises(GptjaxError, match=r"'char:N' needs an integer N in \[18, 65536\]"):
            make_tokenizer(spec, ["abc"], "/nonexistent")
