"""FLOPs, bytes moved, MFU and bandwidth use of each workload, from gptjax.config's size calculator.

Formulas (N_mm = matmul weights of the blocks, L layers, D width, V vocab; 2 FLOPs per multiply-add):
  forward_flops(B, T)      = B·(2·N_mm·T + 2·D·V·T' + 2·L·D·T·(T+1))   T' = 1 with last-position logits, else T
  prefill (B, T)           = forward_flops(B, T, last_only=True)
  decode (B, prompt P, n)  = prefill(B, P) + B·(forward_flops(1, P+n-1) - forward_flops(1, P))
                             (the prefill yields the first token; n-1 decode steps, one position each)
  train step (B, T)        = 3·forward_flops(B, T)   (backward = 2 x forward)
  MFU                      = FLOPs / seconds / the peak of the matmul the row runs on (ceiling_for), measured now
Bytes moved (lower bounds: what must cross memory at least once):
  prefill                  = weight bytes (each weight read once)
  decode step              = weight bytes + B · KV bytes per token · context length read
  train step               = 4·N·(2 + 7): weights read in forward and backward, AdamW reads p, g, m, v and
                             writes p, m, v (fp32 state)
  bandwidth use            = bytes per second / bandwidth (the measured read bandwidth, or the datasheet HBM)
"""

from __future__ import annotations

from typing import Any

from gptjax import precision
from gptjax.config import GPTConfig

FORMULAS = ("FLOPs (gptjax.config's size calculator, 2 per multiply-add): prefill = forward_flops(B, T, "
            "last_only=True); decode of n tokens after a prompt P = prefill(B, P) + B·(forward_flops(1, P+n-1) - "
            "forward_flops(1, P)); train step = 3·forward_flops(B, T). Bytes (lower bounds): prefill = weight bytes; "
            "decode = n·(weight bytes + B·KV bytes/token·(P + n/2)); train = 4·N·(2 + 7). MFU = FLOP/s / the "
            "measured peak of the matmul the row runs on (gptjax's CPU kernel where it runs, else XLA's dot of the "
            "mode's compute dtype), shown as \"> ceiling\" where it is still above 1 (the ceiling was measured "
            "low); bandwidth use = bytes/s / the read bandwidth (or datasheet HBM).")

# which measured matmul ceiling a precision mode's dots run at (the registry's compute_dtype): weight-only
# int8 dequantises into the activation dtype (fp32 here), so its compute ceiling is fp32's; w8a8 multiplies
# int8 x int8.
COMPUTE_DTYPE = {name: m.compute_dtype for name, m in precision.MODES.items()}

# the gptjax CPU kernel whose peak a mode's matmuls run at where the kernels run (bench.ceilings.kernel_peaks):
# bf16 on the bf16 GEMM (training too), int8 (per-token above 64 rows), w8a8 and int4 (unpacked to int8) on the
# int8 VNNI GEMM; fp32 and fp8 (a float32 copy) on XLA's fp32 dot. Against XLA's dot instead, w8a8 prefill read
# 127% and bf16 training 112% (issue 30): the kernels outrun XLA's int8/bf16 dot 2-3x here.
KERNEL_CEILING = {"bf16": "bf16", "int8": "int8", "w8a8": "int8", "int4": "int8"}


def prefill_flops(config: GPTConfig, batch: int, seq: int) -> int:
    """FLOPs of a prefill: a forward pass over [batch, seq] producing the last position's logits."""
    return config.forward_flops(batch, seq, last_only=True)


def decode_flops(config: GPTConfig, batch: int, prompt: int, new: int) -> int:
    """FLOPs to generate `new` tokens per row after a `prompt`-token prefill (the prefill included)."""
    steps = config.forward_flops(1, prompt + new - 1) - config.forward_flops(1, prompt) if new > 1 else 0
    return prefill_flops(config, batch, prompt) + batch * steps


def train_flops(config: GPTConfig, batch: int, seq: int) -> int:
    """FLOPs of one training step (forward + backward) over [batch, seq] tokens: 3 x the forward pass."""
    return 3 * config.forward_flops(batch, seq)


def decode_step_bytes(config: GPTConfig, precision: str, kv_cache: str, batch: int, context: float) -> float:
    """Bytes one decode step reads at least: every weight once, and each row's KV cache over `context` tokens."""
    return config.weight_bytes(precision) + batch * config.kv_cache_bytes_per_token(kv_cache) * context


def train_step_bytes(config: GPTConfig) -> int:
    """Bytes one fp32 AdamW step moves at least: 4·N·(2 weight reads + 4 optimizer reads + 3 writes)."""
    return 4 * config.num_params() * (2 + 7)


def utilisation(achieved: float, peak: float | str | None) -> float | None:
    """achieved / peak, or None when the peak is unknown or unsupported (a str)."""
    return achieved / peak if isinstance(peak, (int, float)) and peak > 0 else None


def ceiling_for(row: dict[str, Any], ceiling: dict[str, Any], kernels: bool) -> tuple[str, float | None]:
    """(name, peak FLOP/s) of the matmul ceiling a row actually runs on: gptjax's CPU kernel of its mode when
    `kernels` ran it ("kernel int8"), else XLA's dot of the mode's compute dtype ("xla fp32"); a peer's row its
    own measured peak (its `peak_flops` field) or ("-", None); the peak is None when unmeasured or unsupported."""
    if row.get("peer") is not None:
        peak = row.get("peak_flops")
        return ("peer", peak) if _measured(peak) else ("-", None)
    kernel = KERNEL_CEILING.get(row["precision"]) if kernels else None
    if kernel is not None and _measured(ceiling.get("kernel_flops", {}).get(kernel)):
        return f"kernel {kernel}", ceiling["kernel_flops"][kernel]
    dtype = COMPUTE_DTYPE[row["precision"]]
    peak = ceiling["matmul_flops"].get(dtype)
    return f"xla {dtype}", peak if _measured(peak) else None


def mfu_fields(row: dict[str, Any], flops_per_s: float, ceiling: dict[str, Any], kernels: bool) -> dict[str, Any]:
    """A row's `mfu` against ceiling_for's peak, `mfu_ceiling` (its name) and `ceiling_low` (True when the row
    still ran above it: the ceiling was measured too low, e.g. at a small --matmul-n or under load)."""
    name, peak = ceiling_for(row, ceiling, kernels)
    mfu = utilisation(flops_per_s, peak)
    return {"mfu": mfu, "mfu_ceiling": name, "ceiling_low": mfu is not None and mfu > 1.0}


def mfu_text(row: dict[str, Any]) -> str:
    """A row's MFU as shown: "45.2%", "> ceiling (re-measure ...)" above 100%, "-" when unknown."""
    mfu = row.get("mfu")
    if mfu is None:
        return "-"
    return CEILING_LOW if mfu > 1.0 else f"{mfu:.1%}"


CEILING_LOW = "> ceiling (re-measure at a larger --matmul-n)"


def _measured(peak: Any) -> bool:
    return isinstance(peak, (int, float)) and not isinstance(peak, bool) and peak > 0
