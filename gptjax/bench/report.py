"""The results file (one JSON object per line, each with a schema version), the markdown table, and the
ratio table between two runs (`gptjax bench --compare OLD.jsonl NEW.jsonl`).

Line kinds: "environment" (versions, devices, threads), "ceiling" (measured matmul FLOP/s and bandwidth, the
datasheet entry if any), "check" (device-check correctness), "workload" (one backend's measurement of one
workload). Every line has "schema" (SCHEMA) and "run" (the run id); see README for the workload fields. The reader
checks what the tables use of each line (strict JSON, the schema, a measured workload's fields and their types) and
names the file and line of the first it cannot use."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from gptjax.bench.metrics import mfu_text
from gptjax.checks import is_int, is_real
from gptjax.errors import GptjaxError, parse_json

SCHEMA = "gptjax.bench/1"
MAX_DEPTH = 16  # levels of nesting a row may have (results rows have 3: a ceiling's datasheet flops)
_NAME = (True, lambda v: isinstance(v, str), "a string")
# what --compare reads of a measured workload: (required?, check, what is allowed)
_FIELDS = {"workload": _NAME, "backend": _NAME, "precision": _NAME, "preset": _NAME,
           "batch": (True, lambda v: is_int(v) and 1 <= v < 2**63, "an integer >= 1"),
           **dict.fromkeys(("seq", "prompt", "new"), (False, lambda v: v is None or (is_int(v) and 1 <= v < 2**63),
                                                      "an integer >= 1 or null")),
           "kv_cache": (False, lambda v: v is None or isinstance(v, str), "a string or null"),
           "tokens_per_s": (True, lambda v: is_real(v) and v > 0, "a finite number > 0"),
           "latency_s": (False, lambda v: v is None or isinstance(v, dict), "an object or null")}
_LATENCY = (False, lambda v: v is None or (is_real(v) and v >= 0), "a finite number >= 0 or null")
KEY_FIELDS = ("workload", "backend", "precision", "kv_cache", "preset", "batch", "seq", "prompt", "new")


def write_jsonl(path: str, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows, one JSON object per line."""
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Rows of a results file; a GptjaxError naming the file and line for anything the tables could not use: a
    missing file, a line that is not strict JSON (bad UTF-8, NaN or Infinity, a key twice, nesting past
    MAX_DEPTH), another schema, or a measurement missing a field --compare prints or holding a wrong value."""
    try:
        with open(path, "rb") as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    except OSError as e:
        raise GptjaxError(f"cannot read {path}: {e.strerror}") from None
    rows = []
    for n, line in lines:
        row = parse_json(line, f"{path}:{n}")
        if not isinstance(row, dict) or row.get("schema") != SCHEMA:
            found = row.get("schema") if isinstance(row, dict) else type(row).__name__
            raise GptjaxError(f"{path}:{n}: schema {_shown(found)}; this gptjax reads {SCHEMA!r}")
        problem = _depth_problem(row) or _row_problem(row)
        if problem:
            raise GptjaxError(f"{path}:{n}: {problem}")
        rows.append(row)
    return rows


def _shown(value: Any) -> str:
    """A value as an error message shows it: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _depth_problem(row: dict[str, Any]) -> str | None:
    """Why a row nests too deeply to be a results row (they nest 3 deep: a ceiling's datasheet flops)."""
    stack = [(row, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"the row nests deeper than {MAX_DEPTH} levels"
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack += [(child, depth + 1) for child in children if isinstance(child, (dict, list))]
    return None


def _row_problem(row: dict[str, Any]) -> str | None:
    """What is wrong with the fields of a row that the tables read (None: nothing): any row's kind, and a
    measured workload's identity, shape, tokens/s and latency."""
    if not isinstance(row.get("kind", ""), str):
        return f"kind is {_shown(row['kind'])}; expected a string"
    if row.get("kind") != "workload" or row.get("status") != "ok":
        return None
    lengths = ("prompt", "new") if row.get("workload") == "decode" else ("seq",)  # its shape: required, not null
    return _fields_problem(row, _FIELDS | dict.fromkeys(lengths, _FIELDS["batch"])) or _fields_problem(
        row.get("latency_s") or {}, {"p50": _LATENCY}, "latency_s.")


def _fields_problem(row: dict[str, Any], fields: dict[str, tuple], prefix: str = "") -> str | None:
    """The first of `fields` (name: (required?, check, what is allowed)) that row lacks or holds wrongly."""
    for name, (required, ok, allowed) in fields.items():
        if name not in row and required:
            return f"a measured workload without {prefix}{name}"
        if name in row and not ok(row[name]):
            return f"{prefix}{name} is {_shown(row[name])}; expected {allowed}"
    return None


def row_key(row: dict[str, Any]) -> tuple:
    """What identifies a measurement across runs: workload, backend, precision, cache mode, preset and shape."""
    return tuple(row.get(k) for k in KEY_FIELDS)


def _shape(row: dict[str, Any]) -> str:
    if row["workload"] == "decode":
        return f"B{row['batch']} P{row['prompt']}+{row['new']}"
    return f"B{row['batch']} T{row['seq']}"


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def _latency(row: dict[str, Any]) -> str:
    lat = row.get("latency_s") or {}
    return " / ".join(_num(1e3 * lat[q], ".1f") for q in ("p50", "p90", "p99")) if lat else "-"


def grid(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A markdown table's lines: the header, the separator, then one line per row of cells."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The workload rows as a markdown table (skipped variants listed under it with their reason)."""
    head = ("| workload | shape | backend | precision | tokens/s | vs peer | latency p50 / p90 / p99 ms | TTFT ms "
            "| compile s | GFLOP/s | MFU | MFU of | MFU datasheet | BW use measured | BW use datasheet "
            "| params / cache MiB |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    work = [r for r in rows if r.get("kind") == "workload"]
    for r in (r for r in work if r["status"] == "ok"):
        mem = r.get("memory", {})
        cache = mem.get("cache_bytes")
        lines.append(
            f"| {r['workload']} | {_shape(r)} | {r['backend']} | {r['precision']} | {r['tokens_per_s']:,.1f} "
            f"| {_num(r.get('vs_peer'), '.2f') + ('x' if r.get('vs_peer') else '')} | {_latency(r)} "
            f"| {_num(r.get('ttft_s') and 1e3 * r['ttft_s'], '.1f')} | {_num(r.get('compile_s'), '.2f')} "
            f"| {r['flops_per_s'] / 1e9:,.1f} | {mfu_text(r)} | {r.get('mfu_ceiling') or '-'} "
            f"| {_pct(r.get('mfu_datasheet'))} | {_pct(r.get('bw_use_measured'))} | {_pct(r.get('bw_use_datasheet'))} "
            f"| {mem.get('params_bytes', 0) / 2**20:,.1f} / {_num(cache and cache / 2**20, ',.1f')} |")
    skipped = [r for r in work if r["status"] != "ok"]
    notes = [f"- skipped: {r['workload']} {_shape(r)} {r['backend']} {r['precision']}: {r.get('message')}"
             for r in skipped]
    return "\n".join(lines + ([""] + notes if notes else []))


def environment_line(env: dict[str, Any]) -> str:
    """The environment in one markdown paragraph."""
    versions = ", ".join(f"{k} {env[k]}" for k in ("gptjax", "jax", "jaxlib", "flax", "numpy", "torch",
                                                    "transformers") if env.get(k))
    return (f"environment: git {env.get('git')}; {versions}; python {env.get('python')}; platform "
            f"{env.get('platform')}, {env.get('device_count')} x {env.get('device_kind')}; CPU {env.get('cpu')}, "
            f"{env.get('cores')} cores; XLA_FLAGS={env.get('XLA_FLAGS')!r}; gptjax CPU kernels: "
            f"{env.get('cpu_kernels')}; peer threads {env.get('peer_threads')}; "
            f"load average at start {env.get('load_avg_1m')}")


_OPS = {"int8": "OP", "bf16": "FLOP", "fp32": "FLOP"}  # int8 multiplies count as operations, not FLOPs


def ceilings_table(ceiling: dict[str, Any]) -> str:
    """The measured ceilings (and datasheet peaks, labelled) as a markdown table."""
    sheet = ceiling.get("datasheet") or {}
    lines = ["| ceiling | measured now | datasheet |", "|---|---|---|"]
    for dtype, value in ceiling["matmul_flops"].items():
        peak = (sheet.get("flops") or {}).get(dtype)
        shown = f"{value / 1e12:.3f} TFLOP/s" if isinstance(value, (int, float)) else value
        lines.append(f"| matmul {dtype} ({ceiling['matmul_n']}³) | {shown} | "
                     f"{_num(peak and peak / 1e12, ',.0f') + (' TFLOP/s' if peak else '')} |")
    for dtype, value in ceiling.get("kernel_flops", {}).items():
        lines.append(f"| gptjax {dtype} kernel ({ceiling['matmul_n']}³) | {value / 1e12:.3f} T{_OPS[dtype]}/s | – |")
    for name, value in ceiling["bandwidth"].items():
        hbm = sheet.get("hbm_bytes_per_s") if name == "read" else None
        lines.append(f"| memory {name.replace('_', ' ')} ({ceiling['bandwidth_bytes'] / 2**20:.0f} MiB) "
                     f"| {value / 1e9:,.1f} GB/s | {_num(hbm and hbm / 1e9, ',.0f') + (' GB/s HBM' if hbm else '')} |")
    if sheet:
        lines.append(f"\ndatasheet: {sheet['name']} ({sheet['source']}); figures are the vendor's, not measured")
    return "\n".join(lines)


def compare_table(old: list[dict[str, Any]], new: list[dict[str, Any]], threshold: float = 0.9) -> str:
    """tokens/s and p50 latency of each measurement in both runs, the ratio new/old, and the regressions
    (new/old below threshold) marked; measurements in only one run are listed."""
    index = {row_key(r): r for r in old if r.get("kind") == "workload" and r.get("status") == "ok"}
    lines = ["| workload | shape | backend | precision | old tokens/s | new tokens/s | new/old | old p50 ms "
             "| new p50 ms | |", "|---|---|---|---|---|---|---|---|---|---|"]
    seen, only_new = set(), []
    for r in (r for r in new if r.get("kind") == "workload" and r.get("status") == "ok"):
        o = index.get(row_key(r))
        if o is None:
            only_new.append(r)
            continue
        seen.add(row_key(r))
        ratio = r["tokens_per_s"] / o["tokens_per_s"]
        p50 = lambda x: (x.get("latency_s") or {}).get("p50")  # noqa: E731
        lines.append(f"| {r['workload']} | {_shape(r)} | {r['backend']} | {r['precision']} "
                     f"| {o['tokens_per_s']:,.1f} | {r['tokens_per_s']:,.1f} | {ratio:.2f}x "
                     f"| {_num(p50(o) and 1e3 * p50(o), '.1f')} | {_num(p50(r) and 1e3 * p50(r), '.1f')} "
                     f"| {'slower' if ratio < threshold else ''} |")
    extra = [f"- only in new: {r['workload']} {_shape(r)} {r['backend']} {r['precision']}" for r in only_new]
    extra += [f"- only in old: {o['workload']} {_shape(o)} {o['backend']} {o['precision']}"
              for k, o in index.items() if k not in seen]
    return "\n".join(lines + ([""] + extra if extra else []))
