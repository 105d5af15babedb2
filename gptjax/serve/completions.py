"""The answer side of /v1/completions: each choice's tokens, text (cut at a stop string) and finish reason, and
the OpenAI `logprobs` object (tokens, token_logprobs, top_logprobs, text_offset) built from `Backend.score` of
the prompt plus the completion.

Log-probabilities are those of the model's raw distribution (the log-softmax of its logits given the prefix,
before temperature, top-k/top-p, penalties or logit bias), as vLLM reports them by default; they come from
scoring prompt + completion after the tokens were generated, in the server's precision mode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from gptjax.scoring import GrowingScores
from gptjax.serve.stops import StopText
from gptjax.tokenizer import Tokenizer


class TokenText:
    """Each token's own text for `logprobs.tokens` and `top_logprobs` keys: the tokenizer's decoding of that one
    token (a partial UTF-8 character shows as U+FFFD), or "token_id:N" for a model without a tokenizer."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}  # per request: bounded by the tokens one request holds

    def __call__(self, token: int) -> str:
        text = self._cache.get(token)
        if text is None:
            text = self.tokenizer.decode([token]) if self.tokenizer is not None else f"token_id:{token}"
            self._cache[token] = text
        return text

    def decode(self, ids: list[int]) -> str:
        """Text of ids ("" without a tokenizer)."""
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""


class Choice:
    """One choice of a response being built: its prompt, the tokens received, the text and the finish reason."""

    def __init__(self, index: int, prompt: list[int], stops: Sequence[str], text: TokenText, echo: bool) -> None:
        self.index, self.prompt, self.echo = index, prompt, echo
        self.stop = StopText(text.decode, stops)
        self.finish: str | None = None
        self.sent_tokens = 0  # completion tokens already reported (streaming)
        self.offset = 0  # text_offset of the next reported token (streaming)
        self.started = False  # whether the first chunk (with the echoed prompt) was sent
        self.scorer: GrowingScores | None = None  # its log-probabilities so far (gptjax.serve.serving._score)

    @property
    def tokens(self) -> list[int]:
        """The completion's tokens: all received, or up to the one that completed the stop string."""
        return self.stop.ids[:self.stop.used]

    def add(self, tokens: list[int], finish: str | None) -> str:
        """Take an event's tokens; the new text. A stop string sets finish to "stop" (the caller stops the row)."""
        if self.finish is not None:
            return ""
        delta = self.stop.add(tokens)
        if self.stop.stopped:
            self.finish = "stop"
        elif finish is not None:
            delta += self.stop.flush()
            self.finish = "stop" if self.stop.stopped else finish
        return delta

    def sequence(self) -> list[int]:
        """Prompt + completion: what scoring reads."""
        return self.prompt + self.tokens


def logprobs_block(scores: Any, positions: range, k: int, text: TokenText, offset: int) -> dict[str, Any]:
    """The OpenAI logprobs object for the tokens at `positions` of a scored sequence: each token's text and
    log-probability (None for the sequence's first token, which has no prefix), its top-k alternatives plus
    itself as {text: logprob}, and its character offset in the choice's text, starting at `offset`."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in positions:
        token = int(scores.tokens[t])
        value = float(scores.logprobs[t])
        piece = text(token)
        out["tokens"].append(piece)
        out["text_offset"].append(offset)
        offset += len(piece)
        if t == 0 or math.isnan(value):
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(value)
        top: dict[str, float] = {}
        for i, lp in zip(scores.top_ids[t][:k], scores.top_logprobs[t][:k]):
            top.setdefault(text(int(i)), float(lp))  # two ids with one text: the likelier (listed first) stays
        top.setdefault(piece, value)
        out["top_logprobs"].append(top)
    return out


def usage(prompts: Sequence[list[int]], choices: Sequence[Choice]) -> dict[str, int]:
    """OpenAI's usage: each prompt counted once, every choice's completion tokens."""
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
