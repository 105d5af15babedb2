"""Tokenizers: GPT-2's byte-level BPE read from local files, and a 256-symbol byte tokenizer for raw text."""

from __future__ import annotations

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


def load_tokenizer(path: str | os.PathLike) -> BPETokenizer:
    """GPT-2's tokenizer from `tokenizer.json`, or `vocab.json` + `merges.txt`, in a checkpoint directory."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    d = Path(path)
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
