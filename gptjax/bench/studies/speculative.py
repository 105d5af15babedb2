"""Speculative decoding against plain decoding of the same target, same prompts, same run.

    gptjax bench --study speculative --target runs/<teacher>/model --drafts ngram,runs/<student>/model
    gptjax bench --study speculative --target gpt2 --drafts ngram      # the gpt2 shape, random weights

Each cell (batch size, drafter, k) decodes --prompts distinct prompts (--prompt tokens each, spread over held-out
text: a checkpoint's validation split in its own tokenizer, or the stdlib corpus's as bytes for a preset), B at a
time, greedy; plain decoding and every (drafter, k) are interleaved round by round after a warm-up call that
compiles (gptjax.speculative.decode_rounds, as `gptjax generate --draft` measures). Reported: tokens/s (generated
tokens over the whole generate calls, prefill included), the speed-up over plain decoding (median of the rounds,
with their min-max), the draft tokens accepted summed over the prompts with a 95% confidence interval (a seeded
bootstrap over the generate calls: tokens of one prompt are not independent draws), and the tokens one target
pass yields per row (1 + accepted / verify rounds). --new is capped by the smallest context of target and drafts.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from gptjax import data, get_backend, get_preset, init_params, load_checkpoint
from gptjax.bench.results import Outcome
from gptjax.errors import GptjaxError
from gptjax.heldout import checkpoint_validation_tokens
from gptjax.sampling import GREEDY
from gptjax.speculative import Gain, ModelDraft, NgramDraft, decode_rounds, gain
from gptjax.timing import bootstrap_ci
from gptjax.tokenizer import ByteTokenizer

FLAGS = {"--target": ("gpt2", "a checkpoint directory, or a preset name (random weights)"),
         "--drafts": ("ngram", "comma list: ngram and/or draft checkpoint directories"),
         "--ks": ("2,4,8", "comma list of draft tokens per target pass"),
         "--batches": ("1,4", "comma list of batch sizes"),
         "--prompts": (8, "distinct prompts per cell (each cell decodes all of them, B at a time)"),
         "--prompt": (64, "prompt tokens per row"),
         "--new": (128, "new tokens per row (capped by the context: prompt + new <= n_positions)"),
         "--runs": (3, "timed rounds, configurations interleaved"),
         "--seed": (0, "seed of the bootstrap's resampling")}
LEVEL = 0.95  # the acceptance interval's confidence


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise GptjaxError(f"{flag} {text!r} must be a comma list of integers") from None
    if any(v < 1 for v in values):
        raise GptjaxError(f"{flag} {text!r}: every value must be >= 1")
    return values


def prepare(args: argparse.Namespace) -> None:
    """A GptjaxError for values the study cannot run with."""
    _ints(args.ks, "--ks"), _ints(args.batches, "--batches")
    if args.runs < 1 or args.new < 2 or args.prompt < 1 or args.prompts < 1:
        raise GptjaxError(f"--runs {args.runs} >= 1, --new {args.new} >= 2, --prompt {args.prompt} >= 1 and "
                          f"--prompts {args.prompts} >= 1 needed")


def _model(spec: str) -> tuple[Any, Any, str]:
    """(config, params, name) of a checkpoint directory or a preset with random weights."""
    if Path(spec).exists():
        config, params = load_checkpoint(spec)
        path = Path(spec).resolve()
        return config, params, path.parent.name if path.name == "model" else path.name  # train's DIR/model
    return get_preset(spec), init_params(get_preset(spec), seed=0), f"{spec} (random)"


def heldout_prompts(target: str, config: Any, n: int, length: int) -> list[list[int]]:
    """n distinct prompts of `length` tokens, evenly spread over held-out text: a checkpoint's validation split
    in its tokenizer, else (a preset) the stdlib corpus's validation split as bytes."""
    if Path(target).exists():
        tokens, _ = checkpoint_validation_tokens(target, config)
    else:
        tokens, _ = data.validation_tokens(None, ByteTokenizer(), 0.05, config.vocab_size)
    room = len(tokens) - length
    if room < n:
        raise GptjaxError(f"the held-out text has {len(tokens)} tokens: too few for --prompts {n} distinct "
                          f"prompts of --prompt {length}")
    starts = np.linspace(0, room, n).astype(int)
    return [[int(t) for t in tokens[s:s + length]] for s in starts]


def fit_new(args: argparse.Namespace, contexts: list[int], log: Any) -> int:
    """--new, capped so that prompt + new fits the smallest context of target and drafts (said when it is)."""
    room = min(contexts) - args.prompt
    if room < 2:
        raise GptjaxError(f"--prompt {args.prompt} leaves {room} tokens of the context {min(contexts)}: need >= 2")
    if args.new > room:
        log(f"--new {args.new} capped to {room}: prompt {args.prompt} + new must fit the context {min(contexts)}")
    return min(args.new, room)


def _drafts(spec: str) -> dict[str, Any]:
    drafts = {}
    for item in spec.split(","):
        if item == "ngram":
            drafts["ngram"] = NgramDraft()
        else:
            d_config, d_params, name = _model(item)
            drafts[f"{name} ({d_config.num_params():,} params)"] = ModelDraft(d_params, d_config)
    return drafts


def run(args: argparse.Namespace, log: Any) -> Outcome:
    """Plain and speculative greedy decoding per batch size, interleaved round by round."""
    config, params, target = _model(args.target)
    drafts = _drafts(args.drafts)
    new = fit_new(args, [config.n_positions] + [d.config.n_positions for d in drafts.values()
                                                 if isinstance(d, ModelDraft)], log)
    prompts = heldout_prompts(args.target, config, args.prompts, args.prompt)
    backend = get_backend("jax", config)
    weights = backend.prepare(params)
    rows = []
    for B in _ints(args.batches, "--batches"):
        batches = [prompts[i:i + B] for i in range(0, len(prompts), B)]
        configs = {("plain", 0): (None, 0)} | {(name, k): (d, k) for name, d in drafts.items()
                                                for k in _ints(args.ks, "--ks")}
        log(f"speculative: {target}, B={B}, {len(configs)} configurations x {args.runs} rounds x {len(prompts)} "
            f"prompts ...")
        runs = decode_rounds(backend, weights, batches, new, GREEDY, configs, args.runs)
        common = {"target": target, "target_params": config.num_params(), "batch": B, "prompt": args.prompt,
                  "new": new, "prompts": len(prompts)}
        rows += [common | cell_row(name, k, gain(runs[("plain", 0)], r), [s for s, _ in r], args.seed)
                 for (name, k), r in runs.items()]
    return Outcome(rows, f"gptjax bench --study speculative: {target}, greedy, {len(prompts)} prompts x "
                   f"({args.prompt} + {new} new tokens), median of {args.runs} rounds", table(rows))


def cell_row(draft: str, k: int, g: Gain, times: list[float], seed: int) -> dict[str, Any]:
    """One cell's fields: speed, the speed-up's median and range, acceptance with its bootstrap interval."""
    row = {"draft": draft, "k": k, "tokens_per_s": g.tokens_per_s, "speedup": g.speedup,
           "speedup_min": g.speedup_range[0], "speedup_max": g.speedup_range[1], "times_s": times,
           "same_tokens": g.same_tokens, "accepted": g.accepted, "proposed": g.proposed,
           "per_call": [list(c) for c in g.per_call], "acceptance": g.acceptance, "acceptance_ci": None,
           "tokens_per_pass": 1 + g.accepted / (g.proposed / k) if k and g.proposed else 1.0}
    if k and g.proposed:
        row["acceptance_ci"] = list(bootstrap_ci(g.per_call, _pooled, seed=seed, level=LEVEL))
    return row


def _pooled(calls: list[tuple[int, int]]) -> float:
    """Accepted over proposed, summed over the calls (a ratio estimator: long calls weigh more)."""
    proposed = sum(p for _, p in calls)
    return sum(a for a, _ in calls) / proposed if proposed else 0.0


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table: per batch and drafter, tokens/s, acceptance (95% CI), tokens per pass, speed-up."""
    lines = [("| B | draft | k | tokens/s | acceptance (95% CI) | accepted / proposed | tokens per target pass "
              "| speed-up (min-max) |"), "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc, counts = "-", "-"
        if r["acceptance"] is not None:
            lo, hi = r["acceptance_ci"]
            acc, counts = f"{r['acceptance']:.1%} ({lo:.1%}-{hi:.1%})", f"{r['accepted']}/{r['proposed']}"
        lines.append(f"| {r['batch']} | {r['draft']} | {r['k'] or '-'} | {r['tokens_per_s']:,.1f} | {acc} | {counts} "
                     f"| {r['tokens_per_pass']:.2f} | {r['speedup']:.2f}x ({r['speedup_min']:.2f}-"
                     f"{r['speedup_max']:.2f}) |")
    return "\n".join(lines)
