"""Stop strings (gptjax.serve.stops): the cut is the token-by-token one whatever the chunking (issue 31, point 1).

A completion's tokens arrive in chunks whose sizes depend on the server's configuration (--chunk-size, batching
mode, a speculative round's accepted run). The text returned, and the tokens reported with it, must not: these
tests feed the same tokens in many random chunkings and compare each with a token-by-token oracle written
independently here."""

import random

import pytest

from gptjax.serve.completions import Choice, TokenText
from gptjax.serve.stops import StopText
from gptjax.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
# a vocabulary of multi-character and partial-character tokens (as BPE has): "None", "one", "ne", "é" in two
# halves, an invalid byte, and single letters
PIECES = [b"N", b"o", b"n", b"e", b" ", b"one", b"ne", b"None", b"\xc3", b"\xa9", b"\xff", b"A", b"B", b"ab", b"\xc3\xa9"]


def _decode(ids: list[int]) -> str:
    return b"".join(PIECES[i] for i in ids).decode("utf-8", errors="replace")


def _oracle(decode, ids: list[int], stops: list[str], finished: bool) -> tuple[str, int, bool]:
    """Token by token: after each token, the stable text (all of it at the end of a finished generation, else
    without a trailing U+FFFD); the first time some stop appears in it, cut where the occurrence that ends
    earliest (then: begins earliest) begins, keeping the tokens so far."""
    for k in range(1, len(ids) + 1):
        text = decode(ids[:k])
        if not (finished and k == len(ids)):
            text = text.rstrip("\ufffd")
        hits = sorted((text.find(s) + len(s), text.find(s)) for s in stops if s in text)
        if hits:
            return text[:hits[0][1]], k, True
    text = decode(ids)
    return (text if finished else text.rstrip("\ufffd")), len(ids), False


def _feed(decode, ids: list[int], stops: list[str], sizes: list[int], finished: bool) -> tuple[str, int, bool, str]:
    """StopText fed ids in chunks of the given sizes (then flushed when finished): (text, tokens used, stopped,
    the concatenated deltas)."""
    stop, deltas, i = StopText(decode, stops), [], 0
    for size in sizes:
        deltas.append(stop.add(ids[i:i + size]))
        i += size
    if finished:
        deltas.append(stop.flush())
    return stop.text, stop.used, stop.stopped, "".join(deltas)


def _chunkings(n: int, rng: random.Random) -> list[list[int]]:
    """Chunk sizes covering n tokens: one at a time, 4s, 16s, all at once, and random ones."""
    fixed = [[size] * -(-n // size) for size in (1, 4, 16)] + [[n]]
    randoms = []
    for _ in range(6):
        sizes, left = [], n
        while left > 0:
            sizes.append(rng.randint(1, min(left, 7)))
            left -= sizes[-1]
        randoms.append(sizes)
    return fixed + randoms


def test_the_issue_example_cuts_where_the_first_completed_stop_begins():
    # "None" with stops "one " and "ne": "ne" completes first (at the 4th byte); "one " begins earlier but
    # completes later. Chunks of 1 gave "No"; chunks of 4 and --draft ngram gave "N" before the fix.
    ids = list(b"None of")
    for sizes in ([1] * 7, [4, 3], [7], [2, 5]):
        assert _feed(TOK.decode, ids, ["one ", "ne"], sizes, finished=False) == ("No", 4, True, "No"), sizes


def test_token_ids_are_exactly_those_of_the_returned_text():
    # stop "\ufffd": the stable text only contains a replacement character once the byte after it arrived (a
    # partial character may still complete). Before the fix: token_ids [65, 195] came back with the text "Aé".
    ids = [65, 195, 169, 255, 66, 67]
    for sizes in ([1] * 6, [6], [2, 4], [3, 3]):
        text, used, stopped, streamed = _feed(TOK.decode, ids, ["\ufffd"], sizes, finished=True)
        assert (text, used, stopped, streamed) == ("Aé", 5, True, "Aé"), sizes
        assert TOK.decode(ids[:used]).startswith(text + "\ufffd")
    # at the end of generation a trailing replacement character is final: it completes the stop there
    assert _feed(TOK.decode, [65, 195], ["\ufffd"], [2], finished=True)[:3] == ("A", 2, True)
    assert _feed(TOK.decode, [65, 195], ["\ufffd"], [1, 1], finished=True)[:3] == ("A", 2, True)


@pytest.mark.parametrize("seed", range(40))
def test_every_chunking_gives_the_token_by_token_answer(seed):
    rng = random.Random(seed)
    ids = [rng.randrange(len(PIECES)) for _ in range(rng.randint(1, 24))]
    text = _decode(ids)
    stops = [text[i:i + rng.randint(1, 4)] for i in rng.sample(range(len(text)), min(3, len(text)))]
    stops = [s for s in stops if s] + rng.sample(["one ", "ne", "\ufffd", "éA", "NoneN", "e n"], 2)
    for finished in (True, False):
        want = _oracle(_decode, ids, stops, finished)
        for sizes in _chunkings(len(ids), rng):
            text_, used, stopped, streamed = _feed(_decode, ids, stops, sizes, finished)
            assert (text_, used, stopped) == want, (ids, stops, sizes, finished)
            assert streamed == text_  # nothing sent was taken back
        if want[2]:  # the text is a function of the tokens kept: replaying them alone gives it again
            assert _feed(_decode, ids[:want[1]], stops, [want[1]], finished=False)[:3] == want
            assert not _oracle(_decode, ids[:want[1] - 1], stops, finished=False)[2]


def test_a_choice_reports_the_tokens_of_its_text_whatever_the_events():
    ids = list(b"class A:\n    None of it")
    for sizes in ([1] * len(ids), [4] * 6, [16, 8], [3, 1, 9, 11]):
        choice, i = Choice(0, [1], ["one ", "ne"], TokenText(TOK), echo=False), 0
        for size in sizes:
            choice.add(ids[i:i + size], None)
            i += size
            if choice.finish:
                break
        assert choice.finish == "stop" and choice.stop.text == "class A:\n    No", sizes
        assert choice.tokens == ids[:ids.index(ord("e"), 15) + 1], sizes
