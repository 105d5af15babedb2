"""`gptjax bench --compare OLD NEW` on corrupted results files (issue 31 point 6): a mutation fuzzer over a committed
results file asserts that every mutation gives either a sound comparison or one line naming the file and line
(exit 2), never a traceback; every committed results file still reads, and compares byte for byte as before."""

import json
import math
import random
import re
from pathlib import Path

import pytest

from gptjax.bench.report import compare_table, read_jsonl
from gptjax.cli import main
from gptjax.errors import GptjaxError

RESULTS = Path(__file__).parent.parent / "benchmarks" / "results"
BASE = RESULTS / "quick-gpt2-cpu.jsonl"  # 34 lines: environment, ceiling, 32 workloads (jax and the hf peer)
MUTATIONS = 320
RAW = "\0raw\0"  # a placeholder json.dumps keeps as a string, replaced by raw JSON text afterwards

# values a field may be changed to: other types, huge and non-finite numbers, deep nesting (raw JSON text)
VALUES = ["text", "", 0, -3, 1.5, True, None, [], {}, [1, 2], {"p50": 1}]
RAW_VALUES = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400, "1" + "0" * 5000, "1e-400",
              "[" * 64 + "]" * 64, "[" * 5000 + "]" * 5000, "[" * 200_000 + "]" * 200_000, '{"a": {"b": {"c": 1}}}']


def _paths(row: dict, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a row (nested objects included)."""
    out = []
    for k, v in row.items():
        out.append(prefix + (k,))
        if isinstance(v, dict):
            out += _paths(v, prefix + (k,))
    return out


def _set(row: dict, path: tuple, value: object) -> None:
    for k in path[:-1]:
        row = row[k]
    row[path[-1]] = value


def _delete(row: dict, path: tuple) -> None:
    for k in path[:-1]:
        row = row[k]
    del row[path[-1]]


def _mutate_row(rng: random.Random, line: str) -> str:
    """One line with one field deleted, retyped, made huge/non-finite/deep, duplicated, or the row replaced."""
    row = json.loads(line)
    path = rng.choice(_paths(row))
    op = rng.choice(["delete", "value", "raw", "raw", "twice", "not an object"])
    if op == "delete":
        _delete(row, path)
    elif op == "value":
        _set(row, path, rng.choice(VALUES))
    elif op == "raw":
        _set(row, path, RAW)
        return json.dumps(row).replace(json.dumps(RAW), rng.choice(RAW_VALUES))
    elif op == "twice":  # the same key again at the front of the row
        return "{" + json.dumps(path[0]) + ": " + json.dumps(rng.choice(VALUES)) + ", " + json.dumps(row)[1:]
    else:
        return rng.choice(["[]", "1", '"row"', "null", "[" + line + "]"])
    return json.dumps(row)


def mutate(rng: random.Random, data: bytes) -> bytes:
    """The results file with one corruption: a mutated line (most often a workload's), a truncation, invalid
    UTF-8, a flipped byte, or a line's text cut short."""
    op = rng.choice(["row"] * 6 + ["truncate", "utf8", "flip", "cut line"])
    lines = data.decode().splitlines(keepends=True)
    n = rng.randrange(len(lines))
    if op == "row":
        return "".join(lines[:n] + [_mutate_row(rng, lines[n]) + "\n"] + lines[n + 1:]).encode()
    if op == "truncate":
        return data[:rng.randrange(len(data))]
    if op == "utf8":
        i = rng.randrange(len(data))
        return data[:i] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xfe\xff"]) + data[i:]
    if op == "flip":
        i = rng.randrange(len(data))
        return data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:]
    cut = lines[n][:rng.randrange(len(lines[n]))]
    return "".join(lines[:n] + [cut + "\n"] + lines[n + 1:]).encode()


def _is_positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < math.inf


def _sound(path: Path) -> bool:
    """The oracle for an accepted file: plain json reads every line, and each measurement --compare uses has the
    fields it prints, of the right types (written independently of gptjax's reader)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if not (isinstance(row, dict) and row.get("schema") == "gptjax.bench/1"):
            return False
        if row.get("kind") != "workload" or row.get("status") != "ok":
            continue
        lengths = ("prompt", "new") if row.get("workload") == "decode" else ("seq",)
        names = [row.get(k) for k in ("workload", "backend", "precision", "preset")]
        counts = [row.get(k) for k in ("batch", *lengths)]
        lat = row.get("latency_s")
        p50 = lat.get("p50") if isinstance(lat, dict) else None
        if not (all(isinstance(x, str) for x in names) and _is_positive(row.get("tokens_per_s"))
                and all(isinstance(x, int) and not isinstance(x, bool) for x in counts)
                and (row.get("kv_cache") is None or isinstance(row.get("kv_cache"), str))
                and (lat is None or isinstance(lat, dict)) and (p50 is None or p50 == 0 or _is_positive(p50))):
            return False
    return True


def test_a_corrupted_results_file_is_compared_or_named_in_one_line(tmp_path, capsys):
    """Before the fix, 73 of these 320 mutations went wrong: 64 tracebacks (43 UnicodeDecodeError, 8 RecursionError,
    5 ValueError past the int digit limit, 4 KeyError, 3 TypeError, 1 AttributeError) and 9 comparisons of rows
    holding NaN, Infinity or 1e400. After: 250 named in one line, 70 compared."""
    rng, data = random.Random(31), BASE.read_bytes()
    wrong, outcomes = [], {"named": 0, "compared": 0}
    for i in range(MUTATIONS):
        mutated = tmp_path / f"m{i}.jsonl"
        mutated.write_bytes(mutate(rng, data))
        old_new = [str(BASE), str(mutated)] if i % 2 else [str(mutated), str(BASE)]
        try:
            status = main(["bench", "--compare", *old_new])
        except BaseException as e:  # noqa: BLE001 - a traceback is what this test looks for
            wrong.append(f"m{i}: {type(e).__name__}: {str(e)[:100]}")
            continue
        problem = _check_outcome(mutated, status, *capsys.readouterr())
        if problem:
            wrong.append(f"m{i}: {problem}")
        else:
            outcomes["named" if status else "compared"] += 1
    assert not wrong, f"{len(wrong)} of {MUTATIONS} mutations: {wrong}"
    assert outcomes["named"] > 200 and outcomes["compared"] > 50, outcomes  # both exercised (250 and 70)


def _check_outcome(mutated: Path, status: int, out: str, err: str) -> str | None:
    """What is wrong with --compare's answer on a mutated file: a comparison of a file the oracle finds unsound,
    or an error that is not one line naming the file and a line of it; None when the answer is right."""
    if status == 0:
        sound = _sound(mutated) and out.startswith("| workload | shape |") and err == ""
        return None if sound else "compared, but it holds a measurement --compare cannot use"
    found = re.fullmatch(rf"gptjax bench: error: {re.escape(str(mutated))}:(\d+)[: ].+\n", err)
    lines = mutated.read_bytes().count(b"\n") + 1
    if status != 2 or out or not found or not 1 <= int(found.group(1)) <= lines:
        return f"status {status}, stderr {err[-300:]!r}"
    return None


@pytest.mark.parametrize("path", sorted(RESULTS.rglob("*.jsonl")), ids=lambda p: p.name)
def test_every_committed_results_file_reads(path):
    if "schema" not in path.read_text(encoding="utf-8").splitlines()[0]:
        pytest.skip("not a gptjax.bench results file (a study's own log)")
    assert len(read_jsonl(str(path))) == len(path.read_text(encoding="utf-8").strip().splitlines())


def test_compare_of_committed_runs_is_unchanged():
    """The table of the issue 14 refactor's two runs, byte for byte as committed (the CLI prints it plus a newline)."""
    runs = RESULTS.parent / "archive" / "issue14-refactor"
    old, new = (read_jsonl(str(runs / f)) for f in ("before-37fb701.jsonl", "after.jsonl"))
    assert compare_table(old, new) + "\n" == (runs / "compare.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("row, needle", [
    ({"tokens_per_s": float("nan")}, "is not valid JSON: NaN is not a finite number"),
    ({"tokens_per_s": 0}, "tokens_per_s is 0; expected a finite number > 0"),
    ({"tokens_per_s": "fast"}, "tokens_per_s is 'fast'; expected a finite number > 0"),
    ({"batch": [1]}, "batch is [1]; expected an integer >= 1"),
    ({"latency_s": {"p50": -1}}, "latency_s.p50 is -1; expected a finite number >= 0 or null"),
    ({"latency_s": [0.1]}, "latency_s is [0.1]; expected an object or null"),
    ({"backend": None}, "backend is None; expected a string"),
    ({"kind": ["workload"]}, "kind is ['workload']; expected a string"),
])
def test_a_bad_measurement_is_named_with_its_field(tmp_path, row, needle):
    lines = (Path(__file__).parent / "fixtures" / "bench_old.jsonl").read_text().splitlines()
    lines[2] = json.dumps(json.loads(lines[2]) | row)
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(GptjaxError) as e:
        read_jsonl(str(tmp_path / "r.jsonl"))
    assert str(e.value).startswith(f"{tmp_path / 'r.jsonl'}:3") and needle in str(e.value), str(e.value)
