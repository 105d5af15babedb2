"""What each precision mode costs in quality, per window length: `gptjax quantize --report`'s quality part
(gptjax.precision_report.quality) over several checkpoints and context lengths, in one results file.

    gptjax bench --study quality --checkpoint runs/<quickstart>/model,tests/fixtures/trained_byte_tiny
    gptjax bench --study quality --checkpoint DIR --seq-lens 64,128 --windows 64 --modes fp32,int8,w8a8,int4

Per checkpoint and window length T: --windows windows of T + 1 tokens of the checkpoint's validation split (its
own tokenizer, as `gptjax quantize --report` reads it), each mode's loss and perplexity change, top-1 and greedy
agreement with fp32 and prefill logit errors, on the JAX backend. Deterministic (no timing): it may run on a busy
machine. A window longer than a model's context is a skipped row; int8 prefills of more than 64 tokens quantise
activations per token (as w8a8), so 64 and 128 bracket that switch.
"""

from __future__ import annotations

import argparse
from typing import Any

from gptjax import precision as registry
from gptjax.bench.results import Outcome
from gptjax.data import eval_windows
from gptjax.errors import GptjaxError
from gptjax.heldout import checkpoint_validation_tokens
from gptjax.precision_report import Mode, report
from gptjax.weights import load_checkpoint

FLAGS = {"--checkpoint": ("", "comma list of checkpoint directories (required)"),
         "--seq-lens": ("64,128", "comma list of window lengths T"),
         "--windows": (64, "validation windows per checkpoint and length"),
         "--modes": (",".join(registry.MODES), "comma list of precision modes, fp32 first (the reference)")}


def _lengths(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.isdigit()]
    if len(values) != len(text.split(",")) or min(values, default=0) < 2:
        raise GptjaxError(f"--seq-lens {text!r}: give window lengths >= 2, e.g. 64,128")
    return values


def prepare(args: argparse.Namespace) -> None:
    """A GptjaxError for values the study cannot run with."""
    if not args.checkpoint:
        raise GptjaxError("--study quality needs --checkpoint DIR[,DIR...]: e.g. runs/<timestamp>/model")
    _lengths(args.seq_lens)
    modes = args.modes.split(",")
    for m in modes:
        registry.mode(m)
    if modes[0] != "fp32" or args.windows < 1:
        raise GptjaxError(f"--modes {args.modes!r} must start with fp32 (the reference), --windows {args.windows} >= 1")


def run(args: argparse.Namespace, log: Any) -> Outcome:
    """Every checkpoint x window length x mode: the precision report's quality fields."""
    modes = [Mode(m) for m in args.modes.split(",")]
    rows = []
    for checkpoint in args.checkpoint.split(","):
        config, params = load_checkpoint(checkpoint)
        tokens, _ = checkpoint_validation_tokens(checkpoint, config)
        for T in _lengths(args.seq_lens):
            where = {"checkpoint": checkpoint, "params": config.num_params(), "seq_len": T}
            if T > config.n_positions:
                rows.append(where | {"status": "skipped", "message": f"T={T} exceeds the context {config.n_positions}"})
                continue
            log(f"quality: {checkpoint}, T={T}, {len(modes)} modes ...")
            windows = eval_windows(tokens, T, args.windows)
            rows += [where | {"status": "ok", "windows": len(windows), "predictions": int(windows[:, 1:].size)}
                     | r.as_dict() for r in report(config, params, windows, modes)]
    return Outcome(rows, f"gptjax bench --study quality: {args.windows} validation windows per length, vs fp32",
                   table(rows))


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table: per checkpoint, length and mode, the quality change against fp32."""
    lines = ["| checkpoint | T | mode | weights MB | Δ perplexity | top-1 = fp32 | greedy = fp32 | max abs Δlogit |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['checkpoint']} | {r['seq_len']} | skipped: {r['message']} | | | | | |")
            continue
        lines.append(f"| {r['checkpoint']} | {r['seq_len']} | {r['mode']} | {r['weight_bytes'] / 1e6:.2f} "
                     f"| {100 * r['perplexity_change']:+.2f}% | {100 * r['top1_agreement']:.2f}% "
                     f"| {100 * r['greedy_agreement']:.1f}% | {r['max_logit_error']:.4f} |")
    return "\n".join(lines)
