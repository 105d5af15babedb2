"""lm-eval per precision mode (docs/evaluation.md): `gptjax bench --study lm-eval` on the quickstart model."""

from __future__ import annotations

from figures.common import Results, block, of_kind
from figures.formats import num, table

LM_EVAL = "lm-eval-byte-mini.jsonl"  # `gptjax bench --study lm-eval` on the quickstart model (docs/evaluation.md)

@block("lm-eval-precision")
def lm_eval_precision(results: Results) -> str:
    """lm-eval's next-line accuracy per precision mode next to the server's tokens/s, and the load average."""
    rows = results[LM_EVAL]
    study = [r for r in rows if r.get("kind") == "study"]
    body = [[r["precision"], f"{r['acc']:.3f} ± {r['acc_stderr']:.3f}", f"{r['acc_norm']:.3f}",
             f"{r['true_line_logprob_per_byte']:.5f}", f"{r['exact_match']:.3f}", num(r["mc_tokens_per_s"], 0),
             num(r["gen_tokens_per_s"], 0)] for r in study]
    env = of_kind(rows, "environment")["env"]
    return (table(["precision", "next-line acc (4 choices)", "acc_norm", "true line log-prob / byte",
                   "greedy exact match", "scored tok/s", "generated tok/s"], body)
            + f"\n{study[0]['docs']} documents per task; lm-eval {study[0]['lm_eval']}; {env['cores']}-core "
              f"{env['cpu']}, git {env['git']}; 1-minute load average {env['load_avg_1m']:.1f} at the start, "
              f"{study[0]['load_avg_1m']:.1f} at the end: other work shared the CPU, so compare the modes' speeds "
              "only loosely.\n")
