"""Speculative decoding against plain decoding of the same target, same prompts, same run.

    gptjax bench --study speculative --target runs/big/export --drafts ngram,runs/small/export
    gptjax bench --study speculative --target gpt2 --drafts ngram      # the gpt2 shape, random weights

For each batch size, plain greedy decoding and every (drafter, k) decode the same prompts (Python source as
byte tokens: repetitive, as code is), interleaved run by run after a warm-up round that compiles. Reported:
tokens/s (generated tokens over the whole generate call, prefill included), the draft tokens' acceptance
rate, the tokens one target pass yields per row (1 + accepted / rounds), and the speed-up over plain decoding.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Any

from gptjax import get_backend, get_preset, init_params, load_checkpoint
from gptjax.bench.results import Outcome
from gptjax.errors import GptjaxError
from gptjax.sampling import GREEDY
from gptjax.speculative import ModelDraft, NgramDraft
from gptjax.timing import interleaved_runs, median, timed_value

FLAGS = {"--target": ("gpt2", "a checkpoint directory, or a preset name (random weights)"),
         "--drafts": ("ngram", "comma list: ngram and/or draft checkpoint directories"),
         "--ks": ("2,4,8", "comma list of draft tokens per target pass"),
         "--batches": ("1,4", "comma list of batch sizes"),
         "--prompt": (64, "prompt tokens per row"), "--new": (64, "new tokens per row"),
         "--runs": (3, "timed rounds, configurations interleaved")}


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
    if args.runs < 1 or args.new < 2 or args.prompt < 1:
        raise GptjaxError(f"--runs {args.runs} >= 1, --new {args.new} >= 2 and --prompt {args.prompt} >= 1 needed")


def _model(spec: str) -> tuple[Any, Any, str]:
    """(config, params, name) of a checkpoint directory or a preset with random weights."""
    if Path(spec).exists():
        config, params = load_checkpoint(spec)
        path = Path(spec).resolve()
        return config, params, path.parent.name if path.name == "model" else path.name  # train's DIR/model
    return get_preset(spec), init_params(get_preset(spec), seed=0), f"{spec} (random)"


def _prompts(n: int, length: int) -> list[list[int]]:
    """n different windows of Python source (this module's), as byte tokens."""
    text = inspect.getsource(inspect.getmodule(_prompts)).encode()
    return [list(text[i * 97: i * 97 + length]) for i in range(n)]


def run(args: argparse.Namespace, log: Any) -> Outcome:
    """Plain and speculative greedy decoding per batch size, interleaved round by round."""
    config, params, target = _model(args.target)
    drafts = {}
    for spec in args.drafts.split(","):
        if spec == "ngram":
            drafts["ngram"] = NgramDraft()
        else:
            d_config, d_params, name = _model(spec)
            drafts[f"{name} ({d_config.num_params():,} params)"] = ModelDraft(d_params, d_config)
    backend = get_backend("jax", config)
    weights = backend.prepare(params)
    rows = []
    for B in _ints(args.batches, "--batches"):
        prompts = _prompts(B, args.prompt)
        fns = {("plain", 0): lambda i, p=prompts: timed_value(lambda: backend.generate(weights, p, args.new,
                                                                                      sampling=GREEDY))}
        for name, draft in drafts.items():
            for k in _ints(args.ks, "--ks"):
                fns[(name, k)] = lambda i, p=prompts, d=draft, k=k: timed_value(lambda: backend.generate(
                    weights, p, args.new, sampling=GREEDY, draft=d, num_speculative_tokens=k))
        log(f"speculative: {target}, B={B}, {len(fns)} configurations x {args.runs} rounds ...")
        results = interleaved_runs(fns, args.runs, warmup=1)
        plain = median([s for _, s in results[("plain", 0)]])
        for (name, k), runs in results.items():
            seconds, result = median([s for _, s in runs]), runs[0][0]
            generated = sum(len(t) for t in result.tokens)
            row_rounds = result.proposed / k if k else 0
            rows.append({"target": target, "target_params": config.num_params(), "draft": name, "k": k, "batch": B,
                         "prompt": args.prompt, "new": args.new, "tokens_per_s": generated / seconds,
                         "acceptance": result.accepted / result.proposed if k else None,
                         "tokens_per_pass": 1 + result.accepted / row_rounds if k else 1.0,
                         "speedup": plain / seconds, "times_s": [s for _, s in runs],
                         "same_tokens": result.tokens == results[("plain", 0)][0][0].tokens})
    return Outcome(rows, f"gptjax bench --study speculative: {target}, greedy, prompt {args.prompt} + "
                   f"{args.new} new tokens, median of {args.runs} rounds", table(rows))


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table: per batch and drafter, tokens/s, acceptance, tokens per target pass, speed-up."""
    lines = ["| B | draft | k | tokens/s | acceptance | tokens per target pass | speed-up |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "-" if r["acceptance"] is None else f"{100 * r['acceptance']:.1f}%"
        lines.append(f"| {r['batch']} | {r['draft']} | {r['k'] or '-'} | {r['tokens_per_s']:,.1f} | {acc} "
                     f"| {r['tokens_per_pass']:.2f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)
