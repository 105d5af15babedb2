"""The peers (docs/benchmarks.md, "The peers"): gptjax against llama.cpp, CTranslate2, ONNX Runtime and HF."""

from __future__ import annotations

from figures.common import Results, Row, block, of_kind
from figures.formats import num, ratio, table

PEERS = "peers-gpt2-cpu.jsonl"  # `gptjax bench --preset gpt2 --peer llama.cpp,ct2,ort,hf --workloads decode,prefill`

PEER_NAMES = {"llama.cpp": "llama.cpp", "ct2": "CTranslate2", "ort": "ONNX Runtime", "hf": "HF transformers"}

WIDTHS = {"fp32": "fp32", "bf16": "16-bit", "int8": "8-bit", "w8a8": "8-bit", "fp8": "8-bit", "int4": "4-bit"}

def _group(r: Row) -> tuple[str, int, str]:
    """(workload, batch or length, width) of a row of the peers run: its measurement group."""
    modes = r["peer"]["maps"].split(" -> ")[0].split("/") if r["backend"] != "jax" else [r["precision"]]
    return r["workload"], r["batch"] if r["workload"] == "decode" else r["seq"], WIDTHS[modes[0]]


def _speed(r: Row) -> float:
    """tokens/s: decode without the prompt's prefill, prefill as measured."""
    return r.get("decode_tokens_per_s") or r["tokens_per_s"]


def _cell(rows: list[Row], label: bool = True) -> str:
    parts = []
    for r in rows:
        what = {"ok": num(_speed(r)) if r["status"] == "ok" else "", "failed_check": "failed its check",
                "skipped": "refused"}[r["status"]]
        parts.append(f"{r['precision']} {what}".strip() if label or r["status"] != "ok" else what)
    return ", ".join(parts) or "–"


@block("peers-table")
def peers_table(results: Results) -> str:
    """The issue's table: per row (workload, batch/length, width) gptjax's modes, each peer's variants, gptjax's
    best over the best peer's (bold below 1x) and the highest load average during the row."""
    rows = [r for r in results[PEERS] if r.get("kind") == "workload"
            and not (r["backend"] == "jax" and r["status"] == "skipped")]
    groups = {}
    for r in rows:
        groups.setdefault(_group(r), []).append(r)
    names = [n for n in PEER_NAMES if any(r["backend"] == n for r in rows)]
    order = list(dict.fromkeys(WIDTHS.values()))  # fp32, 16-bit, 8-bit, 4-bit
    body = []
    for (workload, n, width), group in sorted(groups.items(), key=lambda g: (g[0][0] != "decode", g[0][1],
                                                                              order.index(g[0][2]))):
        ok = [r for r in group if r["status"] == "ok"]
        ours = [r for r in ok if r["backend"] == "jax"]
        theirs = [r for r in ok if r["backend"] != "jax"]
        x = max(map(_speed, ours)) / max(map(_speed, theirs)) if ours and theirs else None
        label = f"decode B={n} {width}" if workload == "decode" else f"prefill T={n} {width}"
        body.append([label, _cell([r for r in group if r["backend"] == "jax"], width != "fp32")]
                    + [_cell([r for r in group if r["backend"] == name]) for name in names]
                    + ["–" if x is None else (f"**{ratio(x)}**" if x < 1 else ratio(x)),
                       num(max(r.get("load_avg_1m") or 0 for r in ok))])
    return table(["row (tok/s)", "gptjax"] + [PEER_NAMES[n] for n in names] + ["gptjax / best peer", "load"], body)


@block("peers-versions")
def peers_versions(results: Results) -> str:
    """Each peer's version, build and threads, as the run recorded them."""
    seen = {}
    for r in results[PEERS]:
        if r.get("kind") == "workload" and r["backend"] != "jax" and "peer" in r:
            seen.setdefault(r["backend"], r["peer"])
    env = of_kind(results[PEERS], "environment")["env"]
    parts = [f"gptjax {env['git']} (jax {env['jax']}, its CPU kernels)"]
    for name, p in seen.items():
        build = p["build"]
        if "system_info" in build:  # "CPU : SSE3 = 1 | ... | OPENMP = 1 | REPACK = 1 |": the features built in
            on = [f.split("=")[0].strip() for f in build["system_info"].split("|") if f.strip().endswith("= 1")]
            flags = ", ".join(f for f in on if f.startswith(("AVX512", "LLAMAFILE", "OPENMP", "REPACK")))
        else:
            flags = ", ".join(build.get("compute_types") or []) or build.get("graph") or build.get("int8")
        version = ("llama-cpp-python " if name == "llama.cpp" else "") + p["version"]
        parts.append(f"{PEER_NAMES[name]}: {version} ({flags}; {p['threads']} threads)")
    return "; ".join(parts)


@block("peers-checks")
def peers_checks(results: Results) -> str:
    """Each peer variant's correctness check: its logit error and greedy agreement against gptjax fp32, the
    tolerance, and the verdict."""
    seen = {}
    for r in results[PEERS]:
        if r.get("kind") == "workload" and r["backend"] != "jax" and (r.get("peer") or {}).get("check"):
            seen.setdefault((r["backend"], r["precision"]), r["peer"]["check"])
    body = [[PEER_NAMES[name], variant, f"{c['max_rel_logit_error']:.1e}", f"{c['greedy_agreement']:.0%}",
             f"{c['tolerance'][0]:g} / {c['tolerance'][1]:.0%}", "passed" if c["passed"] else "**failed**"]
            for (name, variant), c in seen.items()]
    return table(["peer", "variant", "max logit error (of the largest)", "greedy agreement", "tolerance", "check"],
                 body)
