"""Training throughput: gptjax's jitted train step vs Hugging Face GPT-2 + torch AdamW, same shapes, same run.

    python -m benchmarks.train                      # 6 layers, 6 heads, width 384, context 256, batch 16, vocab 65
    python -m benchmarks.train --compute-dtype bf16 --runs 7

Both sides do one AdamW step (forward, backward, update) on a [16, 256] batch; runs are interleaved A B A B after
warm-up, median reported. MFU = training FLOPs per token (GPTConfig.train_flops_per_token: 6·N_mm + 6·L·D·(T+1),
plus the head) x tokens/s / the float32 matmul FLOP/s measured through JAX at start-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax.numpy as jnp
import numpy as np

from benchmarks.common import append_jsonl, environment, interleaved_times, median, torch_threads
from gptjax import GPTConfig
from gptjax.train import TrainConfig, create_state, measure_peak_flops, train_step


def _hf_step(config: GPTConfig, batch: int):
    """fn(tokens [B, T]) running one HF GPT-2 AdamW step, or None without the peer extra."""
    try:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    torch.manual_seed(0)
    hf_config = GPT2Config(vocab_size=config.vocab_size, n_positions=config.n_positions, n_layer=config.n_layer,
                           n_head=config.n_head, n_embd=config.n_embd, resid_pdrop=0.0, embd_pdrop=0.0,
                           attn_pdrop=0.0)
    model = GPT2LMHeadModel(hf_config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    def step(tokens: np.ndarray) -> None:
        x = torch.from_numpy(tokens.astype(np.int64))
        with torch_threads():
            model(x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-head", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=65)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--compute-dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)

    config = GPTConfig(vocab_size=args.vocab, n_positions=args.seq_len, n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd)
    tc = TrainConfig(batch_size=args.batch, seq_len=args.seq_len, compute_dtype=args.compute_dtype)
    graphdef, state = create_state(config, tc)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, args.vocab, (args.batch, args.seq_len + 1)).astype(np.int32) for _ in range(4)]
    holder = {"state": state}

    def ours(i: int) -> None:
        b = batches[i % 4]
        holder["state"], m = train_step(graphdef, tc, holder["state"], b[None, :, :-1], b[None, :, 1:], jnp.float32(0))
        m.loss.block_until_ready()

    fns = {"jax": ours}
    hf = None if args.skip_hf else _hf_step(config, args.batch)
    if hf is not None:
        fns["hf"] = lambda i: hf(batches[i % 4][:, :-1])
    env = environment()
    peak = measure_peak_flops()
    print("environment:", json.dumps(env | {"fp32_matmul_flops": f"{peak / 1e9:.0f} GFLOP/s"}))
    if hf is None and not args.skip_hf:
        print("(HF peer not run: install the `peer` extra)")
    times = interleaved_times(fns, args.runs, warmup=2)
    tokens = args.batch * args.seq_len
    flops_per_token = config.train_flops_per_token(args.seq_len)
    print(f"\ntrain step, {args.n_layer}L/{args.n_head}H/{args.n_embd}, T={args.seq_len}, B={args.batch}, "
          f"vocab {args.vocab}, AdamW, {args.compute_dtype}, median of {args.runs}; MFU vs {peak / 1e9:.0f} GFLOP/s\n")
    print("| backend | median s/step | tokens/s | MFU | vs HF |\n|---|---|---|---|---|")
    rows = []
    for name, ts in times.items():
        tok_s = tokens / median(ts)
        vs = median(times["hf"]) / median(ts) if "hf" in times else None
        rows.append({"benchmark": "train", "backend": name, "tokens_per_s": tok_s, "median_s": median(ts),
                     "mfu": flops_per_token * tok_s / peak, "vs_hf": vs, "config": dataclasses.asdict(config),
                     "compute_dtype": args.compute_dtype})
        print(f"| {name} | {median(ts):.3f} | {tok_s:,.0f} | {flops_per_token * tok_s / peak:.1%} | "
              f"{f'{vs:.2f}x' if vs else '-'} |")
    append_jsonl(args.json, rows, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
