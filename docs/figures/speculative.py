"""Speculative decoding (docs/decode.md): `gptjax bench --study speculative` with trained drafts and prompt lookup."""

from __future__ import annotations

from figures.common import Results, Row, block, of_kind
from figures.formats import num, pct, ratio, table

SPEC_TRAINED = "speculative-trained-cpu.jsonl"  # `gptjax bench --study speculative`, two `gptjax train` runs

SPEC_GPT2 = "speculative-gpt2-ngram-cpu.jsonl"  # the same on the gpt2 shape (random weights), prompt lookup

def _speculative(rows: list[Row]) -> str:
    """A speculative study's rows: per batch and drafter, tokens/s, acceptance, tokens per pass, speed-up; then
    where it ran and the load average."""
    env = of_kind(rows, "environment")["env"]
    study = [r for r in rows if r.get("kind") == "study"]
    body = [[str(r["batch"]), r["draft"], str(r["k"] or "-"), num(r["tokens_per_s"]), pct(r["acceptance"]),
             f"{r['tokens_per_pass']:.2f}", ratio(r["speedup"]), "yes" if r["same_tokens"] else "NO"] for r in study]
    return (table(["B", "draft", "k", "tokens/s", "acceptance", "tokens per target pass", "speed-up vs plain",
                   "same tokens"], body)
            + f"\nTarget: {study[0]['target']}, {study[0]['target_params']:,} params; greedy, prompt "
            f"{study[0]['prompt']} + {study[0]['new']} new tokens; {env['cpu']}, {env['cores']} cores, jax {env['jax']}, "
            f"git {env['git']}; 1-minute load average {env['load_avg_1m']:.1f} at the start, "
            f"{study[-1]['load_avg_1m']:.1f} at the end (other work shared the machine: compare ratios, not "
            f"absolute tokens/s).\n")


@block("speculative-trained")
def speculative_trained(results: Results) -> str:
    """Speculative decoding with a trained draft model and with prompt lookup, against plain decoding."""
    return _speculative(results[SPEC_TRAINED])


@block("speculative-gpt2")
def speculative_gpt2(results: Results) -> str:
    """Prompt lookup on the gpt2 shape, against plain decoding."""
    return _speculative(results[SPEC_GPT2])
