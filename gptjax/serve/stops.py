"""Text of a growing token list, cut at the stop string that completes first: the stable text grows as tokens
arrive, a partial character is held back until its last byte comes, and so is any suffix that could still begin a
stop string, so a stream never sends text it would later have to take back.

The answer does not depend on how the tokens arrive (one at a time, in chunks of 4 or 16, a speculative round's
run of accepted tokens): the stable text after k tokens, S_k = decode(ids[:k]) without its trailing U+FFFD (a
partial character may still complete), only ever grows by appending (S_k is a prefix of S_k+1), and the cut is
made where the first stop string to complete in that text begins: the occurrence that ends earliest, and of two
ending together the one that starts earlier (the longer). The tokens kept are those up to the first k whose stable
text reaches the end of that occurrence. At the end of generation (flush) the whole decoding is stable, trailing
U+FFFD included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[list[int]], str]


class StopText:
    """Feed tokens, get text deltas; `stopped` once a stop string appeared (the text ends just before it)."""

    def __init__(self, decode: Decode, stops: Sequence[str] = ()) -> None:
        """decode: token ids → text; stops: non-empty strings, matched in the completion only (not the prompt)."""
        self.decode, self.stops = decode, tuple(stops)
        self.ids: list[int] = []
        self.text = ""  # the completion's text so far (stable part, cut at a stop once found)
        self.shown = 0  # characters of `text` handed out
        self.stopped = False
        self.used = 0  # tokens that produced the text: all fed, or up to the one completing the stop string

    def add(self, ids: Sequence[int]) -> str:
        """Append tokens; the text that is now certain (a stop ends it: then later calls return "")."""
        if self.stopped:
            return ""
        start = len(self.ids)
        self.ids += ids
        return self._advance(self._stable(len(self.ids), final=False), start, final=False)

    def flush(self) -> str:
        """At the end of generation: whatever was held back (a stop string can still complete here, when a
        trailing replacement character was part of it)."""
        if self.stopped:
            return ""
        return self._advance(self._stable(len(self.ids), final=True), len(self.ids), final=True)

    def _stable(self, k: int, final: bool) -> str:
        """S_k: the text of the first k tokens that later tokens cannot change (all of it when final and k is
        every token)."""
        text = self.decode(self.ids[:k])
        return text if final and k == len(self.ids) else text.rstrip("\ufffd")

    def _advance(self, text: str, start: int, final: bool) -> str:
        """Take the new stable text (the first `start` tokens' had no stop); the delta that is now certain."""
        found = self._first_stop(text)
        if found is None:
            self.text, self.used = text, len(self.ids)
            return self._take(len(text) if final else len(text) - self._held(text))
        begin, end = found
        self.used = next((k for k in range(max(start, 1), len(self.ids) + 1)
                          if len(self._stable(k, final)) >= end), len(self.ids))
        self.text, self.stopped = text[:begin], True
        return self._take(len(self.text))

    def _first_stop(self, text: str) -> tuple[int, int] | None:
        """(begin, end) of the stop string that completes first in text, or None. A string's first occurrence
        is also its earliest-ending one."""
        found = [(i + len(s), i) for s in self.stops if (i := text.find(s)) >= 0]
        if not found:
            return None
        end, begin = min(found)  # earliest end; of those, earliest begin
        return begin, end

    def _held(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _take(self, end: int) -> str:
        end = max(end, self.shown)
        delta, self.shown = self.text[self.shown:end], end
        return delta
