"""Text of a growing token list, cut at the first stop string: the stable text grows as tokens arrive, a partial
character is held back until its last byte comes, and so is any suffix that could still begin a stop string, so
a stream never sends text it would later have to take back."""

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
        text = self.decode(self.ids).rstrip("\ufffd")
        cut = self._first_stop(text)
        if cut is not None:
            self._stop_at(cut, start)
            return self._take(len(self.text))
        self.text, self.used = text, len(self.ids)
        return self._take(len(text) - self._held(text))

    def flush(self) -> str:
        """At the end of generation: whatever was held back (a stop string can still complete here, when a
        trailing replacement character was part of it)."""
        if self.stopped:
            return ""
        text = self.decode(self.ids)
        cut = self._first_stop(text)
        if cut is not None:
            self._stop_at(cut, len(self.ids) - 1)
        else:
            self.text, self.used = text, len(self.ids)
        return self._take(len(self.text))

    def _first_stop(self, text: str) -> int | None:
        """Where the earliest stop string begins in text, or None."""
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _stop_at(self, cut: int, start: int) -> None:
        """Stop: the text ends at cut; `used` counts tokens up to the first one whose text completes the stop."""
        used = len(self.ids)
        for k in range(max(start, 1), len(self.ids) + 1):
            if self._first_stop(self.decode(self.ids[:k])) is not None:
                used = k
                break
        self.text, self.used, self.stopped = self.decode(self.ids)[:cut], used, True

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
