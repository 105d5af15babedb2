"""Precision modes on one shape, one run: weight bytes, quality against fp32, prefill/decode tokens/s and the
fraction of the memory-bandwidth roofline each decode reaches.

    python -m benchmarks.precision                                  # gpt2 shape, random weights: speed + bytes
    python -m benchmarks.precision --checkpoint runs/X/model        # a trained model: + quality on its text
    python -m benchmarks.precision --modes fp32,int8,w8a8 --batches 1,8 --peer-int8

Roofline: a decode step must read every weight byte once (the KV cache is small at these lengths), so
tokens/s x weight bytes / B is the bandwidth the step used; divided by the read bandwidth measured now
through JAX (a 1 GiB reduction) it is the fraction of the roofline. With --peer-int8, PyTorch's dynamic
int8 (quantize_dynamic, W8A8 per token) decodes the same weights in the same run (`peer` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from benchmarks.common import append_jsonl, environment, median, memory_bandwidth, torch_threads
from gptjax import get_preset, init_params
from gptjax.precision_report import Mode, report, table


def parse_modes(spec: str) -> list[Mode]:
    """'fp32,bf16,int8,int8:g64,w8a8,int8:kv-int8' -> Modes (fp32 first)."""
    modes = []
    for item in spec.split(","):
        precision, *opts = item.strip().split(":")
        kw: dict = {}
        for o in opts:
            if o.startswith("g"):
                kw["group_size"] = int(o[1:])
            elif o.startswith("kv-"):
                kw["kv_cache"] = o[3:]
            else:
                raise SystemExit(f"mode option {o!r}: use gN (group size) or kv-MODE")
        modes.append(Mode(precision, **kw))
    if modes[0] != Mode("fp32"):
        modes.insert(0, Mode("fp32"))
    return modes


def peer_int8_decode(params: dict, config, batch: int, prompt: int, new: int, runs: int) -> float | None:
    """Tokens/s of HF GPT-2 with torch dynamic int8 Linear layers (Conv1D converted), greedy, or None."""
    from benchmarks.common import hf_model

    model = hf_model(params, config)
    if model is None:
        return None
    import torch
    from transformers.pytorch_utils import Conv1D

    def to_linear(module):
        for name, child in module.named_children():
            if isinstance(child, Conv1D):
                lin = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1])
                lin.weight.data = child.weight.data.T.contiguous()
                lin.bias.data = child.bias.data
                setattr(module, name, lin)
            else:
                to_linear(child)

    to_linear(model)
    q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    rng = np.random.default_rng(0)
    rates = []
    with torch.inference_mode(), torch_threads():
        for i in range(runs + 1):
            ids = torch.from_numpy(rng.integers(0, config.vocab_size, (batch, prompt)))
            t0 = time.perf_counter()
            q.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                       attention_mask=torch.ones_like(ids))
            if i:
                rates.append(batch * new / (time.perf_counter() - t0))
    return median(rates)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--checkpoint", help="a trained float checkpoint: adds quality on its validation text")
    p.add_argument("--data", help="validation text for --checkpoint (default stdlib)")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--modes", default="fp32,bf16,int8,int8:g128,w8a8,int8:kv-int8")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--prefill", type=int, default=256)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--peer-int8", action="store_true", help="time PyTorch dynamic int8 decode at B=1 too")
    p.add_argument("--jsonl", help="append one JSON line per mode")
    args = p.parse_args(argv)

    windows = None
    if args.checkpoint:
        from gptjax.cli import _validation_tokens
        from gptjax.weights import load_checkpoint

        config, params = load_checkpoint(args.checkpoint)
        ns = argparse.Namespace(checkpoint=args.checkpoint, data=args.data, val_fraction=0.05)
        tokens, _ = _validation_tokens(ns, config)
        T = config.n_positions
        n = min(args.windows, (len(tokens) - 1) // T)
        windows = np.stack([tokens[i * T: i * T + T + 1] for i in range(n)])
    else:
        config = get_preset(args.preset)
        params = init_params(config, seed=0)
    batches = [int(b) for b in args.batches.split(",")]
    env = environment()
    bandwidth = memory_bandwidth()
    print(f"# precision modes: {args.checkpoint or args.preset} ({config.num_params() / 1e6:.1f}M params), "
          f"{env['device_count']} x {env['device_kind']}, {env['cpu']}; gptjax CPU kernels: {env['cpu_kernels']}; "
          f"read bandwidth measured now {bandwidth['read_bytes_per_s'] / 1e9:.1f} GB/s",
          flush=True)
    timing = {"prompt": args.prompt, "new_tokens": args.new, "batches": batches, "prefill_len": args.prefill,
              "runs": args.runs}
    rows = report(config, params, windows, parse_modes(args.modes), timing=timing,
                  progress=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    print(table(rows))
    print("\nroofline (decode reads every weight byte once per step):")
    for r in rows:
        parts = []
        for b, tps in r.decode_tokens_per_s.items():
            used = tps / b * r.weight_bytes
            parts.append(f"B={b}: {used / 1e9:.1f} GB/s = {used / bandwidth['read_bytes_per_s']:.0%}")
        print(f"  {r.mode:14s} " + ", ".join(parts))
    if args.peer_int8:
        peer = peer_int8_decode(params, config, 1, args.prompt, args.new, args.runs)
        if peer is None:
            print("\npeer: torch/transformers not installed (the `peer` extra)")
        else:
            best = max(r.decode_tokens_per_s.get(1, 0) for r in rows[1:])
            print(f"\npeer: PyTorch dynamic int8 (quantize_dynamic) decode B=1: {peer:.1f} tok/s; "
                  f"gptjax's fastest reduced-precision mode at B=1: {best:.1f} tok/s ({best / peer:.2f}x)")
    append_jsonl(args.jsonl, [{"benchmark": "precision", **r.as_dict(), "read_bandwidth": bandwidth["read_bytes_per_s"]}
                              for r in rows], env)
    print(json.dumps({"env": env}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
