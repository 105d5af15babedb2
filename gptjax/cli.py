"""The `gptjax` command: `train`, `eval`, `generate`, `serve`, `quantize`, `info` (size calculator), `demo`,
`backends`, `bench`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from gptjax.config import PRECISIONS, GPTConfig, get_preset
from gptjax.errors import GptjaxError

_OVERRIDES = {  # flag → GPTConfig field
    "--vocab-size": "vocab_size", "--n-positions": "n_positions", "--n-layer": "n_layer",
    "--n-head": "n_head", "--n-embd": "n_embd", "--n-inner": "n_inner",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gptjax` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    provider = None
    try:
        provider = _telemetry(args)
        return args.func(args) or 0
    except GptjaxError as e:
        print(f"gptjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if provider is not None:
            provider.shutdown()  # flush the spans of this command


def _telemetry(args: argparse.Namespace):
    """Configure tracing and log format from the common flags; the provider to flush at exit (or None)."""
    from gptjax.tracing import EXPORTERS, configure

    trace = args.trace
    if trace is None and args.log_format == "text" and not os.environ.get("OTEL_TRACES_EXPORTER"):
        return None  # the common case: import no SDK
    if trace and trace not in EXPORTERS and os.path.sep not in trace and not trace.endswith(".jsonl"):
        raise GptjaxError(f"--trace {trace!r}: give an exporter ({', '.join(EXPORTERS)}) or a file path "
                          "ending in .jsonl (or containing a /)")
    exporter, path = (trace, None) if trace in EXPORTERS else (("jsonl", trace) if trace else (None, None))
    return configure(exporter, path=path, json_logs=args.log_format == "json")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptjax", description=__doc__.split(":", 1)[0] + ": GPT-2 in NumPy and "
                                "Flax NNX, with every LLM performance lever measurable.")
    p.add_argument("--version", action="version", version=f"gptjax {_version()}")
    sub = p.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--trace", metavar="EXPORTER|FILE", help="export OpenTelemetry spans: console, otlp "
                        "(OTEL_EXPORTER_OTLP_ENDPOINT, default http://localhost:4318), none, or FILE.jsonl for JSON "
                        "lines (default: $OTEL_TRACES_EXPORTER, else none); needs the otel extra")
    common.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="json: one JSON object per log record, with trace_id/span_id")
    _add = sub.add_parser
    sub.add_parser = lambda *a, **k: _add(*a, parents=[common], **k)  # every command takes --trace/--log-format

    info = sub.add_parser("info", help="parameters, FLOPs, weight and KV-cache bytes of a preset or checkpoint",
                          description="Print the size calculator's table for a preset or a checkpoint directory; "
                          "with overrides (e.g. --n-layer 6 --n-embd 384) it shows both shapes side by side.")
    info.add_argument("model", nargs="?", default="gpt2", help="preset name or checkpoint directory (default gpt2)")
    for flag, field in _OVERRIDES.items():
        info.add_argument(flag, type=int, dest=field, metavar="N", help=f"override {field}")
    info.add_argument("--seq-len", type=int, metavar="T", help="sequence length for FLOPs (default: the context)")
    info.add_argument("--mesh", metavar="SPEC", help="per-device memory of training on a mesh, e.g. "
                      "data=2,fsdp=2,tensor=2 (sizes need not match this machine's devices)")
    info.add_argument("--batch", type=int, default=8, metavar="B", help="global batch for --mesh (default 8)")
    info.set_defaults(func=_cmd_info)

    demo = sub.add_parser("demo", help="run a random model on the NumPy and JAX backends and compare logits",
                          description="Initialise a model with GPT-2's scheme, run one forward pass on both "
                          "backends, and print their agreement and speed.")
    demo.add_argument("--preset", default="byte-mini", help="model shape (default byte-mini)")
    demo.add_argument("--batch", type=int, default=2, metavar="B", help="batch size (default 2)")
    demo.add_argument("--seq-len", type=int, default=128, metavar="T", help="tokens per row (default 128)")
    demo.add_argument("--seed", type=int, default=0, help="seed for weights and tokens (default 0)")
    demo.set_defaults(func=_cmd_demo)

    gen = sub.add_parser("generate", help="continue a prompt with a checkpoint, printing tokens as they arrive",
                         description="Decode text (with the checkpoint's tokenizer, or bytes for a 256-symbol "
                         "vocabulary) or raw token ids, streaming the continuation as it is produced.")
    gen.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint directory (config.json + "
                     "model.safetensors, tokenizer files optional)")
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="prompt text")
    what.add_argument("--tokens", help="prompt as comma-separated token ids, e.g. 1,2,3")
    gen.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to add (default 64)")
    gen.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy (default 1)")
    gen.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    gen.add_argument("--top-p", type=float, help="sample within the nucleus of probability mass p")
    gen.add_argument("--greedy", action="store_true", help="always take the most likely token")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    gen.add_argument("--stop-token", type=int, action="append", default=[], metavar="ID",
                     help="end at this token id (repeatable)")
    gen.add_argument("--backend", default="jax", help="backend name (default jax; see `gptjax backends`)")
    gen.add_argument("--chunk-size", type=int, default=4, metavar="N", help="decode steps per streamed chunk")
    gen.add_argument("--mesh", metavar="SPEC", help="jax backend over a device mesh, e.g. tensor=2")
    gen.add_argument("--precision", choices=["fp32", "bf16", "int8", "w8a8"], help="how to run the weights "
                     "(default: as the checkpoint stores them; a float checkpoint is converted on load)")
    gen.add_argument("--kv-cache", choices=["fp32", "bf16", "int8"], help="KV-cache storage (default: bf16 for "
                     "bf16, else fp32)")
    gen.set_defaults(func=_cmd_generate)

    tr = sub.add_parser("train", help="train a GPT (default: a small byte-level model on the Python stdlib, ~3 min)",
                        description="Train a GPT with AdamW, checkpoints (orbax), evaluation and TensorBoard logs. "
                        "With no arguments: the byte-mini preset on the running Python's standard library source. "
                        "Overrides are key=value pairs for the model (n_layer=6) or training (lr=1e-3, "
                        "batch_size=16, grad_accum=2, dropout=0.1, compute_dtype=bf16, ...).")
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="model or training setting to change")
    src = tr.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="model preset (default byte-mini)")
    src.add_argument("--config", metavar="FILE", help="JSON with \"preset\" or \"model\" and \"train\" settings")
    tr.add_argument("--out", metavar="DIR", help="run directory (default runs/<timestamp>)")
    tr.add_argument("--data", metavar="SPEC", help="stdlib (default), tinyshakespeare (downloaded), or a file, "
                    "directory or glob of text files")
    tr.add_argument("--tokenizer", metavar="SPEC", help="byte (default), bpe:N (trained on the training split), "
                    "or a checkpoint directory with GPT-2 tokenizer files")
    tr.add_argument("--init", metavar="CHECKPOINT", help="fine-tune this checkpoint (its shape, weights and "
                    "tokenizer files) instead of starting from GPT-2's random initialisation")
    tr.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (default 300)")
    tr.add_argument("--max-time", type=float, metavar="SECONDS", help="stop (evaluate, checkpoint, export) after this")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    tr.add_argument("--skip-nonfinite", action="store_true", help="skip updates whose loss/gradients are not finite "
                    "(default: stop, keeping the last good checkpoint)")
    tr.add_argument("--profile", type=int, default=0, metavar="STEPS", help="capture a jax.profiler trace of this "
                    "many steps (after compilation) into DIR/profile")
    tr.add_argument("--peak-flops", type=float, metavar="FLOP/S", help="MFU denominator (default: measured now)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument("--mesh", metavar="SPEC", help="train over a device mesh, e.g. data=2,fsdp=2,tensor=2 "
                    "(sizes may be -1: the rest of the devices)")
    tr.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus /metrics on this port "
                    "while training")
    tr.add_argument("--metrics-host", default="127.0.0.1", metavar="ADDR", help="address /metrics binds "
                    "(default 127.0.0.1; 0.0.0.0 lets a Prometheus container reach it)")
    tr.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="validation loss, perplexity and bits per byte of a checkpoint",
                        description="Evaluate a checkpoint on the validation split of a corpus (the split "
                        "`gptjax train` uses).")
    ev.add_argument("--checkpoint", required=True, metavar="DIR")
    ev.add_argument("--data", metavar="SPEC", help="as for train (default stdlib)")
    ev.add_argument("--batch-size", type=int, default=8, metavar="B")
    ev.add_argument("--max-batches", type=int, default=50, metavar="N")
    ev.add_argument("--val-fraction", type=float, default=0.05, help="as the run used (default 0.05)")
    ev.add_argument("--seq-len", type=int, metavar="T", help="window length (default: the model's context; use "
                    "the run's seq_len to reproduce its validation figure)")
    ev.set_defaults(func=_cmd_eval)

    q = sub.add_parser("quantize", help="write a bf16/int8 checkpoint, or report every precision mode's trade-off",
                       description="--to int8|bf16 --out DIR writes a quantised checkpoint (int8: symmetric per "
                       "output channel, or per group of --group-size inputs, + float32 scales; the mode is "
                       "recorded in the safetensors metadata and loading never quantises again). --report "
                       "measures fp32, bf16, int8, int8 grouped, w8a8 and the int8 KV cache on the same "
                       "validation windows: bytes, loss/perplexity change, top-1 agreement, logit error, "
                       "prefill and decode tokens/s.")
    q.add_argument("--checkpoint", required=True, metavar="DIR", help="a float checkpoint")
    q.add_argument("--to", choices=["int8", "bf16"], help="write the checkpoint in this precision")
    q.add_argument("--out", metavar="DIR", help="where --to writes (never the source)")
    q.add_argument("--group-size", type=int, metavar="G", help="int8: one scale per G inputs of each output channel "
                   "(default: one per channel)")
    q.add_argument("--keep-head", action="store_true", help="int8: keep the (tied) embedding/LM head float32")
    q.add_argument("--report", action="store_true", help="print the precision report instead of writing")
    q.add_argument("--data", metavar="SPEC", help="report: validation text, as for train (default stdlib)")
    q.add_argument("--val-fraction", type=float, default=0.05, help="report: as the run used (default 0.05)")
    q.add_argument("--seq-len", type=int, metavar="T", help="report: window length (default: the context)")
    q.add_argument("--windows", type=int, default=64, metavar="N", help="report: validation windows (default 64)")
    q.add_argument("--runs", type=int, default=5, metavar="N", help="report: timed runs per mode (default 5)")
    q.add_argument("--no-speed", action="store_true", help="report: quality and bytes only")
    q.add_argument("--json", metavar="FILE", help="report: also write one JSON line per mode")
    q.set_defaults(func=_cmd_quantize)

    _serve_parser(sub)

    backends = sub.add_parser("backends", help="list the available backends (built-in and plugins)")
    backends.set_defaults(func=_cmd_backends)

    bench = sub.add_parser("bench", help="benchmark suite: prefill, decode, train step per precision, with "
                           "measured ceilings, MFU, bandwidth use and an optional HF peer",
                           description="Measure ceilings (matmul FLOP/s per dtype, memory bandwidth) and then each "
                           "workload on whatever platform JAX sees; write results.jsonl, results.md and plots.")
    from gptjax.bench.command import add_arguments

    add_arguments(bench)
    bench.set_defaults(func=_cmd_bench)
    return p


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser("serve", help="an OpenAI-style HTTP API (completions, streaming, /metrics) for a checkpoint",
                        description="Serve a checkpoint over HTTP: POST /v1/completions (JSON or Server-Sent Events), "
                        "GET /v1/models, /health and /metrics, with dynamic batching, a bounded queue (429 when "
                        "full), per-request timeouts and draining on SIGTERM. Needs the serve extra.")
    sv.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint directory (config.json + "
                    "model.safetensors, tokenizer files optional)")
    sv.add_argument("--backend", default="jax", help="backend name (default jax)")
    sv.add_argument("--precision", choices=["fp32", "bf16", "int8", "w8a8"], help="how to run the weights "
                    "(default: as the checkpoint stores them; a float checkpoint is converted on load)")
    sv.add_argument("--kv-cache", choices=["fp32", "bf16", "int8"], help="KV-cache storage (default: bf16 for "
                    "bf16, else fp32)")
    sv.add_argument("--mesh", metavar="SPEC", help="jax backend over a device mesh, e.g. tensor=2")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    sv.add_argument("--api-key", default=os.environ.get("GPTJAX_API_KEY"), metavar="KEY", help="require "
                    "'Authorization: Bearer KEY' on /v1/* (default: $GPTJAX_API_KEY; prefer the variable, "
                    "arguments show in ps)")
    sv.add_argument("--model-name", metavar="NAME", help="model id in /v1/models and responses (default: the "
                    "checkpoint directory's name)")
    sv.add_argument("--max-batch", type=int, default=16, metavar="N", help="requests per batch (default 16)")
    sv.add_argument("--max-queue", type=int, default=64, metavar="N", help="requests waiting for a batch; more "
                    "are refused with 429 (default 64)")
    sv.add_argument("--max-tokens-cap", type=int, metavar="N", help="largest max_tokens accepted (default: the "
                    "context length)")
    sv.add_argument("--request-timeout", type=float, default=60.0, metavar="SECONDS", help="time from arrival "
                    "to the last token; then 504 and the work is cancelled (default 60)")
    sv.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS", help="on SIGTERM, how long "
                    "requests in flight may take to finish (default 30)")
    sv.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N", help="larger request bodies get "
                    "413 (default 1 MiB)")
    sv.add_argument("--chunk-size", type=int, default=4, metavar="N", help="decode steps between hand-overs to "
                    "clients (default 4)")
    sv.add_argument("--batch-wait-ms", type=float, default=20.0, metavar="MS", help="how long a new batch may wait "
                    "for the clients of the previous one to send their next request (default 20)")
    sv.add_argument("--batching", choices=["continuous", "dynamic"], default="continuous", help="continuous: "
                    "requests join a running batch between decode chunks (jax backend without --mesh; others fall "
                    "back to dynamic); dynamic: requests arriving during a batch wait for the next (default "
                    "continuous)")
    sv.add_argument("--no-warmup", action="store_true", help="do not compile before reporting ready")
    sv.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from gptjax import serve
        from gptjax.serve.server import default_model_id
    except ImportError as e:
        raise GptjaxError(f"gptjax serve needs the serve extra ({e.name} is missing): "
                          "pip install 'gptjax[serve]'") from None
    for flag, value, low in (("--port", args.port, 0), ("--max-batch", args.max_batch, 1),
                             ("--max-queue", args.max_queue, 1), ("--max-body-bytes", args.max_body_bytes, 1),
                             ("--chunk-size", args.chunk_size, 1)):
        if value < low:
            raise GptjaxError(f"{flag} {value} must be >= {low}")
    for flag, bad in (("--port", args.port > 65535), ("--request-timeout", args.request_timeout <= 0),
                      ("--drain-timeout", args.drain_timeout < 0)):
        if bad:
            raise GptjaxError(f"{flag} is out of range: --port <= 65535, --request-timeout > 0, --drain-timeout >= 0")
    mesh = None
    if args.mesh:
        from gptjax.sharding import make_mesh, parse_mesh

        mesh = make_mesh(**parse_mesh(args.mesh))
    model = serve.load_model(args.checkpoint, args.backend, precision=args.precision, kv_cache=args.kv_cache,
                             mesh=mesh)
    cap = args.max_tokens_cap
    if cap is not None and not 1 <= cap <= model.backend.config.n_positions:
        raise GptjaxError(f"--max-tokens-cap {cap} must be in [1, {model.backend.config.n_positions}]")
    options = serve.ServeOptions(model_id=args.model_name or default_model_id(args.checkpoint),
                                 api_key=args.api_key or None, max_batch=args.max_batch, max_queue=args.max_queue,
                                 max_tokens_cap=cap, request_timeout=args.request_timeout,
                                 max_body_bytes=args.max_body_bytes, chunk_size=args.chunk_size,
                                 batch_wait=max(0.0, args.batch_wait_ms) / 1e3, batching=args.batching,
                                 warmup=not args.no_warmup)
    return serve.run(model, options, host=args.host, port=args.port, drain_timeout=args.drain_timeout)


def _version() -> str:
    from gptjax import __version__

    return __version__


def resolve_model(name_or_path: str) -> tuple[str, GPTConfig]:
    """A preset name or a checkpoint directory → (label, config)."""
    if os.path.sep in name_or_path or os.path.exists(name_or_path):
        from gptjax.weights import load_config

        return name_or_path, load_config(name_or_path)
    return name_or_path, get_preset(name_or_path)


def _cmd_info(args: argparse.Namespace) -> int:
    label, base = resolve_model(args.model)
    changes = {field: getattr(args, field) for field in _OVERRIDES.values() if getattr(args, field) is not None}
    columns = [(label, base)] + ([("override", base.replace(**changes))] if changes else [])
    if args.seq_len is not None and not 1 <= args.seq_len <= max(c.n_positions for _, c in columns):
        raise GptjaxError(f"--seq-len {args.seq_len} must be in [1, n_positions]")
    print(size_table(columns, args.seq_len))
    if args.mesh:
        print("\n" + mesh_table(columns[-1][1], args.mesh, args.batch, args.seq_len))
    if os.path.isdir(args.model):
        from collections import Counter

        from gptjax.weights import checkpoint_dtypes

        counts = Counter(checkpoint_dtypes(args.model).values())
        print("stored tensors: " + ", ".join(f"{n} x {dtype}" for dtype, n in sorted(counts.items())))
    return 0


def size_table(columns: list[tuple[str, GPTConfig]], seq_len: int | None = None) -> str:
    """The calculator's markdown table for one or more configs (a ratio column when there are two)."""
    rows: list[tuple[str, list[float], str]] = [
        ("n_layer / n_head / n_embd", [0] * len(columns), ""),
        ("parameters", [c.num_params() for _, c in columns], "n"),
        ("  embeddings (wte, wpe, untied head)", [c.embedding_params() for _, c in columns], "n"),
        ("  per block", [c.layer_params() for _, c in columns], "n"),
    ]
    rows += [(f"weights {p}", [c.weight_bytes(p) for _, c in columns], "B") for p in PRECISIONS]
    rows += [("train state fp32 (w, grad, AdamW m, v)", [16 * c.num_params() for _, c in columns], "B")]
    rows += [(f"KV cache per token {p}", [c.kv_cache_bytes_per_token(p) for _, c in columns], "B")
             for p in PRECISIONS]
    rows += [("KV cache, full context, fp32", [c.kv_cache_bytes_per_token() * c.n_positions
                                               for _, c in columns], "B")]
    T = {id(c): min(seq_len or c.n_positions, c.n_positions) for _, c in columns}
    rows += [("forward FLOPs / token", [c.forward_flops_per_token(T[id(c)]) for _, c in columns], "F"),
             ("training FLOPs / token", [c.train_flops_per_token(T[id(c)]) for _, c in columns], "F")]
    header = ["", *(f"{name} (T={T[id(c)]})" for name, c in columns)] + (["ratio"] if len(columns) == 2 else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, values, kind in rows:
        if not kind:
            cells = [f"{c.n_layer} / {c.n_head} / {c.n_embd}" for _, c in columns]
        else:
            cells = [_human(v, kind) for v in values]
        ratio = [f"{values[1] / values[0]:.3f}x" if kind and values[0] else ""] if len(columns) == 2 else []
        lines.append("| " + " | ".join([name, *cells, *ratio]) + " |")
    lines.append("\nFLOPs = 2·N_mm + 2·D·V + 2·L·D·(T+1) per token (causal attention counted exactly); "
                 "training = 3 × forward. int8 = int8 matmul weights + fp32 per-channel scales.")
    return "\n".join(lines)


def mesh_table(config: GPTConfig, spec: str, batch: int, seq_len: int | None) -> str:
    """Per-device bytes of training on a mesh next to one device: what FSDP and tensor parallelism buy."""
    from gptjax.sharding import MESH_AXES, parse_mesh, per_device_bytes

    sizes = parse_mesh(spec)
    if sizes["data"] == -1:
        sizes["data"] = 1
    T = seq_len or config.n_positions
    rows = batch // (sizes["data"] * sizes["fsdp"])
    if batch < 1 or rows * sizes["data"] * sizes["fsdp"] != batch:
        raise GptjaxError(f"--batch {batch} is not divisible by data x fsdp = {sizes['data'] * sizes['fsdp']}")
    one = per_device_bytes(config, {}, batch, T)
    mesh = per_device_bytes(config, sizes, batch, T)
    label = ",".join(f"{k}={sizes[k]}" for k in MESH_AXES)
    lines = [f"| per device (fp32 AdamW, batch {batch}, T={T}) | 1 device | {label} | ratio |", "|---|---|---|---|"]
    for key in one:
        lines.append(f"| {key} | {_human(one[key], 'B')} | {_human(mesh[key], 'B')} | {mesh[key] / one[key]:.3f}x |")
    total = sum(one.values()), sum(mesh.values())
    lines.append(f"| total | {_human(total[0], 'B')} | {_human(total[1], 'B')} | {total[1] / total[0]:.3f}x |")
    return "\n".join(lines)


def _human(value: float, kind: str) -> str:
    if kind == "n":
        return f"{int(value):,}"
    units = ["", "K", "M", "G", "T", "P"]
    step = 1024 if kind == "B" else 1000
    i = 0
    while abs(value) >= step and i < len(units) - 1:
        value, i = value / step, i + 1
    suffix = {"B": ("B" if i == 0 else "iB"), "F": "FLOP"}[kind]
    return f"{value:,.2f} {units[i]}{suffix}" if i else f"{value:,.0f} {suffix}"


def _cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from gptjax.backends import get_backend
    from gptjax.weights import init_params

    config = get_preset(args.preset)
    if not 1 <= args.batch <= 64:
        raise GptjaxError(f"--batch {args.batch} must be in [1, 64]")
    if not 1 <= args.seq_len <= config.n_positions:
        raise GptjaxError(f"--seq-len {args.seq_len} must be in [1, {config.n_positions}] for {args.preset}")
    print(size_table([(args.preset, config)], args.seq_len), end="\n\n")
    params = init_params(config, args.seed)
    tokens = np.random.default_rng(args.seed).integers(0, config.vocab_size, (args.batch, args.seq_len))
    logits = {}
    for name in ("numpy", "jax"):
        backend = get_backend(name, config)
        t0 = time.perf_counter()
        backend.forward(params, tokens)  # first call: converts weights (and compiles, for jax)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        logits[name] = backend.forward(params, tokens)
        steady = time.perf_counter() - t0
        print(f"{name:>5} backend: logits {logits[name].shape}, first call {first:.3f} s, "
              f"then {steady:.3f} s ({tokens.size / steady:,.0f} tokens/s)")
    diff = np.abs(logits["numpy"] - logits["jax"])
    agree = (logits["numpy"].argmax(-1) == logits["jax"].argmax(-1)).mean()
    print(f"max |numpy - jax| = {diff.max():.2e} (mean {diff.mean():.2e}); "
          f"argmax agreement {agree:.1%} over {tokens.size} positions")
    return 0 if diff.max() <= 1e-4 else 1


def _cmd_generate(args: argparse.Namespace) -> int:
    from gptjax.backends import get_backend
    from gptjax.tokenizer import ByteTokenizer, has_tokenizer, load_tokenizer
    from gptjax.weights import load_checkpoint, load_config

    config = load_config(args.checkpoint)
    tokenizer = None
    if has_tokenizer(args.checkpoint):
        tokenizer = load_tokenizer(args.checkpoint)
    elif config.vocab_size == 256:
        tokenizer = ByteTokenizer()
    if args.tokens is not None:
        try:
            prompt = [int(t) for t in args.tokens.split(",")]
        except ValueError:
            raise GptjaxError(f"--tokens {args.tokens!r} must be comma-separated integers, e.g. 1,2,3") from None
    elif tokenizer is None:
        raise GptjaxError(f"{args.checkpoint} has no tokenizer files and a {config.vocab_size}-token vocabulary: "
                          "give the prompt as --tokens 1,2,3")
    else:
        prompt = tokenizer.encode(args.prompt)
    from gptjax.weights import stored_precision

    precision = args.precision or stored_precision(args.checkpoint)
    options = {"precision": precision} if precision != "fp32" or args.precision else {}  # plugins may lack it
    if args.kv_cache:
        options["kv_cache"] = args.kv_cache
    if args.mesh:
        from gptjax.sharding import make_mesh, parse_mesh

        options["mesh"] = make_mesh(**parse_mesh(args.mesh))
    backend = get_backend(args.backend, config, **options)
    stream = backend.stream(load_checkpoint(args.checkpoint)[1], [prompt], args.max_new_tokens,
                            chunk_size=args.chunk_size, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop_tokens=args.stop_token, greedy=args.greedy)
    printer = _TextPrinter(tokenizer) if args.tokens is None else _IdPrinter()
    t0, reason, n = time.perf_counter(), "length", 0
    if args.tokens is None:
        sys.stdout.write(args.prompt)
    for chunk in stream:
        printer.add(chunk.tokens[0])
        n += len(chunk.tokens[0])
        reason = chunk.finish_reasons[0] or reason
    seconds = time.perf_counter() - t0
    print(f"\n[{n} tokens, finish_reason={reason}, {seconds:.2f} s incl. compile]", file=sys.stderr)
    return 0


class _TextPrinter:
    """Prints the new text of a growing token list (decoding it whole, so multi-token characters come out right)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def add(self, ids: list[int]) -> None:
        self.ids += ids
        text = self.tokenizer.decode(self.ids)
        stable = text.rstrip("\ufffd")  # hold back a partial character until its last byte arrives
        sys.stdout.write(stable[len(self.shown):])
        sys.stdout.flush()
        self.shown = stable


class _IdPrinter:
    """Prints token ids, comma-separated, as they arrive."""

    def __init__(self) -> None:
        self.first = True

    def add(self, ids: list[int]) -> None:
        for i in ids:
            sys.stdout.write(("" if self.first else ",") + str(i))
            self.first = False
        sys.stdout.flush()


def _cmd_train(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    import logging
    from pathlib import Path

    from gptjax.train import TrainConfig, TrainingStopped, config_from_overrides, load_run_config, train

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("gptjax").setLevel(logging.INFO)
    if args.resume:
        if not args.out:
            raise GptjaxError("--resume needs --out DIR of the run to continue")
        given = [flag for flag, value in (("--preset", args.preset), ("--config", args.config), ("--data", args.data),
                                           ("--tokenizer", args.tokenizer), ("--init", args.init)) if value]
        if given or args.overrides:
            raise GptjaxError(f"--resume continues the run as configured in {args.out}/run.json; drop "
                              f"{given + args.overrides} (only --max-steps and --max-time may be given)")
        config, tc, extra = load_run_config(Path(args.out) / "run.json")
        data_spec = extra.get("data")
    else:
        config, tc, data_spec = get_preset(args.preset or "byte-mini"), TrainConfig(), None
        if args.config:
            config, tc, data_spec = _config_file(args.config)
        if args.init and any(k.split("=")[0] in GPTConfig.__dataclass_fields__ for k in args.overrides):
            raise GptjaxError("--init fine-tunes the checkpoint's own shape: model overrides cannot apply")
        config, tc = config_from_overrides(config, tc, args.overrides)
        data_spec = args.data or data_spec
    if args.tokenizer is not None:
        tc = dataclasses.replace(tc, tokenizer=args.tokenizer)
    if args.max_steps is not None:
        tc = dataclasses.replace(tc, max_steps=args.max_steps)
    out = args.out or time.strftime("runs/%Y%m%d-%H%M%S")
    print(f"run directory: {out}\nmodel: {json.dumps(dataclasses.asdict(config))}\n"
          f"training: {json.dumps(dataclasses.asdict(tc))}", flush=True)
    mesh = None
    if args.mesh:
        from gptjax.sharding import make_mesh, parse_mesh

        mesh = make_mesh(**parse_mesh(args.mesh))
    metrics = None
    if args.metrics_port is not None:
        from gptjax.tracing import Metrics, serve_metrics

        metrics = Metrics()
        serve_metrics(args.metrics_port, host=args.metrics_host, metrics=metrics)
        print(f"metrics: http://{args.metrics_host}:{args.metrics_port}/metrics", flush=True)
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():  # log lines above the progress bar, not through it
            result = train(config, tc, out, data_spec=data_spec, resume=args.resume, metrics=metrics, mesh=mesh,
                           max_time=args.max_time, skip_nonfinite=args.skip_nonfinite,
                           profile_steps=args.profile, peak_flops=args.peak_flops,
                           progress=not args.no_progress, init_from=args.init)
    except TrainingStopped as e:
        print(f"gptjax train: stopped: {e}", file=sys.stderr)
        return 1
    print(f"done: {result.steps} steps ({result.stop_reason}); validation loss {result.val_loss:.4f} nats/token "
          f"vs unigram baseline {result.unigram_loss:.4f}; {result.val_bpb:.3f} bits/byte\n"
          f"model: {out}/model (gptjax generate --checkpoint {out}/model --prompt 'def ')\n"
          f"TensorBoard: tensorboard --logdir {out}/tb")
    return 0


def _config_file(path: str) -> tuple[GPTConfig, object, str | None]:
    import dataclasses
    import json

    from gptjax.train import TrainConfig

    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        raise GptjaxError(f"--config {path}: {e}") from None
    if not isinstance(spec, dict) or not set(spec) <= {"preset", "model", "train", "data"}:
        raise GptjaxError(f"--config {path}: expected a JSON object with keys preset, model, train, data")
    config = get_preset(spec.get("preset", "byte-mini"))
    try:
        config = config.replace(**spec.get("model", {}))
        tc = dataclasses.replace(TrainConfig(), **spec.get("train", {}))
    except TypeError as e:
        raise GptjaxError(f"--config {path}: {e}") from None
    return config, tc, spec.get("data")


def _cmd_eval(args: argparse.Namespace) -> int:
    import math

    from flax import nnx

    from gptjax import data
    from gptjax.backends.jax import GPT
    from gptjax.train import evaluate
    from gptjax.weights import load_checkpoint

    config, params = load_checkpoint(args.checkpoint)
    tokens, val_docs = _validation_tokens(args, config)
    if args.batch_size < 1 or args.max_batches < 1:
        raise GptjaxError("--batch-size and --max-batches must be >= 1")
    graphdef, weights = nnx.split(GPT(config, params))
    T = _seq_len(args.seq_len, config)
    loss, n = evaluate(graphdef, weights, data.eval_batches(tokens, args.batch_size, T, args.max_batches))
    print(f"validation: {n:,} tokens, loss {loss:.4f} nats/token, perplexity {math.exp(min(loss, 50)):.3f}, "
          f"{data.bits_per_byte(loss, len(tokens), data.corpus_bytes(val_docs)):.4f} bits/byte")
    return 0


def _seq_len(seq_len: int | None, config: GPTConfig) -> int:
    T = seq_len or config.n_positions
    if not 1 <= T <= config.n_positions:
        raise GptjaxError(f"--seq-len {T} must be in [1, {config.n_positions}]")
    return T


def _validation_tokens(args: argparse.Namespace, config: GPTConfig) -> tuple[np.ndarray, list]:
    """The validation split of --data tokenised with the checkpoint's tokenizer (joined as training joins
    documents), and its documents."""
    from gptjax import data
    from gptjax.tokenizer import ByteTokenizer, has_tokenizer, load_tokenizer

    if has_tokenizer(args.checkpoint):
        tokenizer = load_tokenizer(args.checkpoint)
    elif config.vocab_size == 256:
        tokenizer = ByteTokenizer()
    else:
        raise GptjaxError(f"{args.checkpoint} has no tokenizer files and a {config.vocab_size}-token vocabulary")
    if not 0 < args.val_fraction < 1:
        raise GptjaxError(f"--val-fraction {args.val_fraction} must be in (0, 1)")
    _, val_docs = data.split_docs(data.resolve_corpus(args.data), args.val_fraction)
    separator = tokenizer.encode(data.SEPARATOR)  # documents are joined as training joins them
    tokens = np.asarray([i for n, (_, text) in enumerate(val_docs) for i in (separator if n else []) +
                         tokenizer.encode(text)], np.int64)
    if tokens.max(initial=0) >= config.vocab_size:
        raise GptjaxError(f"the tokenizer produced id {tokens.max()} >= the model's vocab_size {config.vocab_size}")
    return tokens, val_docs


def _cmd_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gptjax.quantize import convert
    from gptjax.weights import load_checkpoint, save_checkpoint, stored_precision

    if (args.to is None) == (not args.report):
        raise GptjaxError("give --to MODE --out DIR (write a quantised checkpoint) or --report (measure every mode)")
    stored = stored_precision(args.checkpoint)
    if stored != "fp32":
        raise GptjaxError(f"{args.checkpoint} is already a {stored} checkpoint; quantise from float weights")
    if args.report:
        return _quantize_report(args)
    if not args.out:
        raise GptjaxError("--to needs --out DIR (the quantised checkpoint; the source is never overwritten)")
    source, out = Path(args.checkpoint).resolve(), Path(args.out).resolve()
    if out == source or source in out.parents:
        raise GptjaxError(f"--out {args.out!r} is the source checkpoint or inside it; write the quantised one "
                          "elsewhere")
    config, params = load_checkpoint(source)
    quantised = convert(params, config, args.to, group_size=args.group_size, keep_head=args.keep_head)
    metadata = {"gptjax.group_size": str(args.group_size or 0), "gptjax.keep_head": str(args.keep_head).lower()}
    save_checkpoint(config, quantised, out, metadata=metadata, extra_files_from=source)
    before = sum(np.asarray(v).nbytes for v in params.values())
    after = sum(np.asarray(v).nbytes for v in quantised.values())
    print(f"wrote {out} ({args.to}{f', groups of {args.group_size}' if args.group_size else ''}"
          f"{', head kept float32' if args.keep_head else ''}): weights {after / 1e6:.2f} MB = "
          f"{after / before:.3f} x float32's {before / 1e6:.2f} MB")
    return 0


def _quantize_report(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from gptjax import data
    from gptjax.precision_report import DEFAULT_MODES, report, table
    from gptjax.weights import load_checkpoint

    config, params = load_checkpoint(args.checkpoint)
    if args.runs < 1 or args.windows < 1 or (args.seq_len is not None and args.seq_len < 2):
        raise GptjaxError(f"--runs {args.runs} and --windows {args.windows} must be >= 1, --seq-len >= 2")
    tokens, _ = _validation_tokens(args, config)
    T = _seq_len(args.seq_len, config)
    batches = list(data.eval_batches(tokens, 8, T, -(-args.windows // 8)))
    if not batches:
        raise GptjaxError(f"the validation split has fewer than {T + 1} tokens")
    windows = np.concatenate([np.concatenate([x, y[:, -1:]], 1) for x, y in batches])[: args.windows]
    timing = None if args.no_speed else {"prompt": min(32, config.n_positions // 2),
                                         "new_tokens": min(32, config.n_positions // 2), "runs": args.runs}
    modes = [m for m in DEFAULT_MODES  # a group size must divide both input widths
             if not m.group_size or (config.n_embd % m.group_size == 0 and config.mlp_width % m.group_size == 0)]
    rows = report(config, params, windows, modes, timing=timing,
                  progress=lambda m: print(f"  timing {m}", file=sys.stderr, flush=True))
    print(f"{args.checkpoint}: {len(windows)} validation windows of {T} tokens ({windows[:, 1:].size:,} "
          f"predictions); quality vs fp32 on the JAX backend; speed: median of {args.runs} interleaved runs\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text("\n".join(json.dumps(r.as_dict()) for r in rows) + "\n", encoding="utf-8")
    return 0


def _cmd_backends(args: argparse.Namespace) -> int:
    from gptjax.backends import available_backends

    print("\n".join(available_backends()))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from gptjax.bench.command import main

    return main(args)


if __name__ == "__main__":
    raise SystemExit(main())
