"""The one exception type gptjax raises for bad input at its boundaries, and the strict JSON reader the file
boundaries share (config.json, run.json, token sidecars, tokenizer files, bench results)."""

import errno
import json
import math
import os
from pathlib import Path
from typing import Any


class GptjaxError(ValueError):
    """Bad input (a value, a file, an option) named together with what is allowed."""


def os_cause(e: OSError) -> str:
    """An OSError's cause in one phrase, with its errno name: 'No space left on device (ENOSPC)'."""
    name = errno.errorcode.get(e.errno) if e.errno else None
    return f"{e.strerror or os.strerror(e.errno)} ({name})" if name else str(e)


class RepeatedKey(ValueError):
    """A JSON object naming one key twice (json.loads would keep the last value without a word); args[0]: the key."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: the object as a dict, or RepeatedKey naming the first key given twice."""
    obj = dict(pairs)  # in C: the check below costs a length comparison unless a key repeats
    if len(obj) < len(pairs):
        seen: set[str] = set()
        raise RepeatedKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def _finite(text: str) -> float:
    """json's parse_float and parse_constant: a float, refusing NaN, Infinity and overflow (1e400 -> inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is not a finite number")
    return value


def parse_json(text: str | bytes, source: str) -> Any:
    """JSON text as Python values, refusing what json.loads takes silently (a key twice in one object: which
    value was meant is ambiguous; NaN, Infinity, 1e400) or fails on with other errors (nesting past the recursion
    limit, an integer past Python's digit limit, bytes that are not UTF-8): a GptjaxError naming source."""
    try:
        if isinstance(text, bytes):  # strictly: json.loads would take UTF-16 and lone surrogates from bytes
            text = text.decode("utf-8")
        return json.loads(text, object_pairs_hook=unique_keys, parse_float=_finite, parse_constant=_finite)
    except RepeatedKey as e:
        raise GptjaxError(f"{source}: the key {json.dumps(e.args[0])[:80]} appears twice in one JSON object "
                          "(which value is meant is ambiguous)") from None
    except RecursionError:
        raise GptjaxError(f"{source} is not valid JSON: it nests too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, the int digit limit, a non-finite number
        raise GptjaxError(f"{source} is not valid JSON: {str(e)[:200]}") from None


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's value (parse_json); a GptjaxError naming the file if it cannot be read or parsed."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise GptjaxError(f"cannot read {path}: {e.strerror}") from None
    return parse_json(data, str(path))
