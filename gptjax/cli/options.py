"""Flags several commands share, and the precision-mode lists the CLI offers (the one place to change them)."""

from __future__ import annotations

import argparse
from typing import Any

from gptjax import precision
from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError

# The precision modes as the CLI offers them, from the registry (gptjax.precision)
RUN_PRECISIONS = list(precision.MODES)  # how a backend runs the weights (--precision)
QUANTIZED_CHECKPOINTS = [s for s in precision.STORAGES if s != "fp32"]  # what `gptjax quantize --to` writes

MODEL_OVERRIDES = {  # flag → GPTConfig field
    "--vocab-size": "vocab_size", "--n-positions": "n_positions", "--n-layer": "n_layer",
    "--n-head": "n_head", "--n-embd": "n_embd", "--n-inner": "n_inner",
}


def common_parser() -> argparse.ArgumentParser:
    """The flags every command takes (--trace, --log-format), as a parent parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--trace", metavar="EXPORTER|FILE", help="export OpenTelemetry spans: console, otlp "
                        "(OTEL_EXPORTER_OTLP_ENDPOINT, default http://localhost:4318), none, or FILE.jsonl for JSON "
                        "lines (default: $OTEL_TRACES_EXPORTER, else none); needs the otel extra")
    common.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="json: one JSON object per log record, with trace_id/span_id")
    return common


def add_precision_flags(p: argparse.ArgumentParser) -> None:
    """--precision and --kv-cache of the commands that run a checkpoint (generate, serve)."""
    p.add_argument("--precision", choices=RUN_PRECISIONS, help="how to run the weights "
                   "(default: as the checkpoint stores them; a float checkpoint is converted on load)")
    p.add_argument("--kv-cache", choices=list(precision.KV_CACHES), help="KV-cache storage (default: bf16 for "
                   "bf16, else fp32)")


def add_mesh_flag(p: argparse.ArgumentParser, what: str = "jax backend over a device mesh",
                  example: str = "tensor=2") -> None:
    """--mesh SPEC, which mesh_from reads: `what` the command does on the mesh, with an example SPEC."""
    p.add_argument("--mesh", metavar="SPEC", help=f"{what}, e.g. {example}")


def add_draft_flags(p: argparse.ArgumentParser, draft: str, spec_k: str) -> None:
    """--draft, --spec-k, --draft-precision and --ngram of the commands that decode speculatively (generate,
    serve), which draft_from reads; `draft` and `spec_k` say what they do in this command."""
    p.add_argument("--draft", metavar="DIR|ngram", help=draft)
    p.add_argument("--spec-k", type=int, default=4, metavar="K", help=spec_k)
    p.add_argument("--draft-precision", choices=RUN_PRECISIONS, help="how to run the draft checkpoint's weights "
                   "(default: as it stores them)")
    p.add_argument("--ngram", default="3,1", metavar="MAX,MIN", help="with --draft ngram: the longest and shortest "
                   "n-gram looked up (default 3,1)")


def mesh_from(spec: str | None) -> Any:
    """The device mesh a --mesh SPEC names (e.g. "data=2,tensor=2"), or None without one."""
    if not spec:
        return None
    # gptjax.sharding imports jax (about a second): only commands given --mesh pay for it
    from gptjax.sharding import make_mesh, parse_mesh

    return make_mesh(**parse_mesh(spec))


def seq_len(value: int | None, config: GPTConfig) -> int:
    """--seq-len, or the model's context without one; a GptjaxError outside [1, context]."""
    T = value or config.n_positions
    if not 1 <= T <= config.n_positions:
        raise GptjaxError(f"--seq-len {T} must be in [1, {config.n_positions}]")
    return T
