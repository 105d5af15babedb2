"""Tokenizers: GPT-2's byte-level BPE read from local files, a 256-symbol byte tokenizer for raw text, and a
character vocabulary smaller than bytes (char:N) with an escape for every other character."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from gptjax.errors import GptjaxError, read_json

Built = TypeVar("Built")


class Tokenizer(Protocol):
    """What gptjax needs of a tokenizer."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255; decoding replaces invalid sequences (a model can emit half a character)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        """Text → its UTF-8 bytes."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Bytes → text, invalid UTF-8 shown as U+FFFD."""
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise GptjaxError(f"byte tokenizer got id(s) {bad[:5]} outside [0, 256)")
        return bytes(ids).decode("utf-8", errors="replace")


class BPETokenizer:
    """A `tokenizers.Tokenizer` (GPT-2 byte-level BPE) behind gptjax's Tokenizer protocol."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Text → BPE ids, no special tokens added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """BPE ids → text."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        """The tokenizer.json text (what load_tokenizer reads back)."""
        return self._tok.to_str()


CHAR_FORMAT = "gptjax-char/1"  # the "format" of a CharTokenizer's tokenizer.json
CHAR_ESCAPES = 17  # the escape id and 16 nibble ids after the characters


class CharTokenizer:
    """A vocabulary of vocab_size ids: the characters of `chars` (the most frequent of a training text) are ids
    0..len(chars)-1; id vocab_size-17 is an escape and the last 16 ids are nibbles, so any other character is
    ESC hi lo per UTF-8 byte: every text round-trips, and a vocabulary smaller than bytes (char:64) can be trained
    and scored in bits per byte like any other (escapes are scored as tokens)."""

    def __init__(self, chars: str, vocab_size: int) -> None:
        if len(set(chars)) != len(chars) or len(chars) > vocab_size - CHAR_ESCAPES or len(chars) < 1:
            raise GptjaxError(f"char tokenizer: {len(chars)} distinct characters must fit vocab_size {vocab_size} "
                              f"- {CHAR_ESCAPES} (escape and nibble ids) and be at least one")
        self.chars, self.vocab_size = chars, vocab_size
        self.escape = vocab_size - CHAR_ESCAPES
        self._ids = {c: i for i, c in enumerate(chars)}

    def encode(self, text: str) -> list[int]:
        """Text → ids: a known character's id, else ESC hi lo for each of its UTF-8 bytes."""
        out: list[int] = []
        for c in text:
            i = self._ids.get(c)
            if i is not None:
                out.append(i)
                continue
            for b in c.encode("utf-8"):
                out += [self.escape, self.escape + 1 + (b >> 4), self.escape + 1 + (b & 15)]
        return out

    def decode(self, ids: list[int]) -> str:
        """Ids → text; escaped bytes joined and decoded as UTF-8 (invalid sequences, a stray escape or nibble,
        as U+FFFD: a model can emit them)."""
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise GptjaxError(f"char tokenizer got id(s) {bad[:5]} outside [0, {self.vocab_size})")
        out, pending, n = [], bytearray(), 0
        while n < len(ids):
            hi, lo = (ids[n + 1: n + 3] + [-1, -1])[:2]
            if ids[n] == self.escape and min(hi, lo) > self.escape:
                pending.append((hi - self.escape - 1) << 4 | (lo - self.escape - 1))
                n += 3
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            out.append(self.chars[ids[n]] if ids[n] < len(self.chars) else "\ufffd")
            n += 1
        return "".join(out) + pending.decode("utf-8", errors="replace")

    def to_json(self) -> str:
        """The tokenizer.json text (what load_tokenizer reads back)."""
        return json.dumps({"format": CHAR_FORMAT, "vocab_size": self.vocab_size, "chars": list(self.chars)})


def load_tokenizer(path: str | os.PathLike) -> BPETokenizer | CharTokenizer:
    """A checkpoint directory's tokenizer: GPT-2's BPE from `tokenizer.json`, or `vocab.json` + `merges.txt`; a
    char:N vocabulary from a `tokenizer.json` of format CHAR_FORMAT."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    d = Path(path)
    char = _char_tokenizer(d / "tokenizer.json")
    if char is not None:
        return char
    if (d / "tokenizer.json").is_file():
        return BPETokenizer(_read(d / "tokenizer.json", lambda: HFTokenizer.from_file(str(d / "tokenizer.json"))))
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        tok = HFTokenizer(_read(d / "vocab.json", lambda: models.BPE.from_file(str(d / "vocab.json"),
                                                                              str(d / "merges.txt"))))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return BPETokenizer(tok)
    raise GptjaxError(f"no tokenizer in {str(d)!r}: expected tokenizer.json, or vocab.json + merges.txt")


def _read(file: Path, build: Callable[[], Built]) -> Built:
    """build() of a tokenizer whose JSON file was first read strictly: the tokenizers library keeps the last of a
    key given twice (a vocabulary entry too) without a word, and raises a bare Exception on bad files."""
    try:
        read_json(file)
        return build()
    except GptjaxError as e:
        raise GptjaxError(f"not a valid tokenizers file: {e}") from None
    except Exception as e:
        raise GptjaxError(f"{file} is not a valid tokenizers file: {e}") from None


def _char_tokenizer(path: Path) -> CharTokenizer | None:
    """The CharTokenizer a tokenizer.json describes, or None (no file, or another tokenizer's)."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(spec, dict) or spec.get("format") != CHAR_FORMAT:
        return None
    return CharTokenizer("".join(spec["chars"]), int(spec["vocab_size"]))


def has_tokenizer(path: str | os.PathLike) -> bool:
    """Whether a checkpoint directory carries tokenizer files."""
    d = Path(path)
    return (d / "tokenizer.json").is_file() or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file())


def checkpoint_tokenizer(path: str | os.PathLike, vocab_size: int) -> Tokenizer | None:
    """The tokenizer text goes through for a checkpoint: its own tokenizer files, else bytes for a 256-token
    vocabulary, else None (the model can only be given token ids)."""
    if has_tokenizer(path):
        return load_tokenizer(path)
    return ByteTokenizer() if vocab_size == 256 else None
