"""Ceilings: matmul FLOP/s per dtype and memory bandwidth measured through JAX now, on this device, plus the
datasheet peaks of known accelerators (clearly labelled "datasheet": vendor figures, not measurements). The matmul
is gptjax.peaks.matmul_flops, the function whose cached result is training's MFU denominator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gptjax import precision as registry
from gptjax.timing import best_time
from gptjax.peaks import matmul_flops


@dataclass(frozen=True)
class Datasheet:
    """Dense peak FLOP/s per dtype and HBM bandwidth of one accelerator, as its vendor publishes them."""

    name: str
    flops: dict[str, float]  # dtype -> FLOP/s (int8: OP/s), dense (no 2:4 sparsity)
    hbm_bytes_per_s: float
    source: str


_T = 1e12
COMPUTE_DTYPES = tuple(dict.fromkeys(m.compute_dtype for m in registry.MODES.values()))  # fp32, bf16, int8
# (substring of jax's device_kind, lower case) -> datasheet; the first match wins, so specific names come first.
DATASHEETS: tuple[tuple[str, Datasheet], ...] = (
    ("h200", Datasheet("NVIDIA H200 SXM", {"fp32": 67 * _T, "bf16": 989 * _T, "int8": 1979 * _T}, 4.8e12,
                       "NVIDIA H200 datasheet, dense (sparsity figures halved)")),
    ("h100 pcie", Datasheet("NVIDIA H100 PCIe", {"fp32": 51 * _T, "bf16": 756 * _T, "int8": 1513 * _T}, 2.0e12,
                            "NVIDIA H100 datasheet, dense (sparsity figures halved)")),
    ("h100", Datasheet("NVIDIA H100 SXM", {"fp32": 67 * _T, "bf16": 989 * _T, "int8": 1979 * _T}, 3.35e12,
                       "NVIDIA H100 datasheet, dense (sparsity figures halved)")),
    ("a100-sxm4-40gb", Datasheet("NVIDIA A100 SXM 40GB", {"fp32": 19.5 * _T, "bf16": 312 * _T, "int8": 624 * _T},
                                 1.555e12, "NVIDIA A100 datasheet, dense")),
    ("a100-pcie-40gb", Datasheet("NVIDIA A100 PCIe 40GB", {"fp32": 19.5 * _T, "bf16": 312 * _T, "int8": 624 * _T},
                                 1.555e12, "NVIDIA A100 datasheet, dense")),
    ("a100", Datasheet("NVIDIA A100 80GB", {"fp32": 19.5 * _T, "bf16": 312 * _T, "int8": 624 * _T}, 2.039e12,
                       "NVIDIA A100 datasheet, dense")),
    ("tpu v5 lite", Datasheet("TPU v5e", {"bf16": 197 * _T, "int8": 394 * _T}, 819e9, "Google Cloud TPU v5e spec")),
    ("tpu v5e", Datasheet("TPU v5e", {"bf16": 197 * _T, "int8": 394 * _T}, 819e9, "Google Cloud TPU v5e spec")),
    ("tpu v5", Datasheet("TPU v5p", {"bf16": 459 * _T, "int8": 918 * _T}, 2765e9, "Google Cloud TPU v5p spec")),
    ("tpu v4", Datasheet("TPU v4", {"bf16": 275 * _T, "int8": 275 * _T}, 1228e9, "Google Cloud TPU v4 spec")),
)


def datasheet_for(device_kind: str) -> Datasheet | None:
    """The datasheet entry whose key occurs in this device kind (e.g. "NVIDIA H100 80GB HBM3"), or None."""
    kind = device_kind.lower()
    return next((sheet for key, sheet in DATASHEETS if key in kind), None)


def bf16_kernel_flops(n: int, runs: int = 5) -> float:
    """FLOP/s (2n³ per call) of gptjax's CPU bf16 kernel (gptjax_bf16_matmul, GEMM-shaped at these sizes) on an
    n x n x n product, best of runs: the peak the bf16 mode's matmuls run at where the kernels do, beside XLA's."""
    from gptjax.backends import cpu_kernels

    return matmul_flops("bf16", n, runs, matmul=cpu_kernels.bf16_matmul)


def int8_kernel_ops(n: int, runs: int = 5) -> float:
    """OP/s (2n³ per call) of gptjax's own int8 GEMM kernel (gptjax/_kernels/gemm_int8.cc, through
    cpu_kernels.int8_matmul: x int8 [n, n] . w int8 [n, n]^T -> int32) under jax.jit, best of runs: the peak its
    int8 modes can reach on this CPU, which XLA's int8 dot (at about its float32 rate here) does not show."""
    from gptjax.backends import cpu_kernels

    return matmul_flops("int8", n, runs, matmul=cpu_kernels.int8_matmul)


def kernel_peaks(n: int, runs: int = 5) -> dict[str, float | str]:
    """{dtype: OP/s} of gptjax's own CPU GEMM kernels where they run ({} elsewhere), the MFU denominators of
    the modes that use them (suite rows: mfu, through metrics.ceiling_for; mfu_kernel)."""
    from gptjax.backends import cpu_kernels

    if not cpu_kernels.available():
        return {}
    return {dtype: peak(n, runs) for dtype, peak in KERNEL_PEAKS.items()}


# compute dtype -> the OP/s of gptjax's own CPU kernel for it (measured only where the kernels run)
KERNEL_PEAKS = {"bf16": bf16_kernel_flops, "int8": int8_kernel_ops}


def memory_bandwidth(n_bytes: int, runs: int = 5) -> dict[str, float]:
    """Bytes/s through JAX now, best of runs: "read" (a sum over n_bytes), "copy" (device to device: read n_bytes,
    write them into a donated buffer, 2·n_bytes of traffic, no fresh pages), "host_to_device" and
    "device_to_host" (n_bytes each way; accelerators only)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    x = jnp.ones(n_bytes // 4, jnp.float32)
    read = jax.jit(jnp.sum)
    copy = jax.jit(lambda src, dst: src + 1.0, donate_argnums=1)
    holder = [jnp.zeros_like(x)]

    def copy_once() -> None:
        holder[0] = copy(x, holder[0])
        holder[0].block_until_ready()

    out = {"read": n_bytes / best_time(lambda: read(x).block_until_ready(), runs),
           "copy": 2 * n_bytes / best_time(copy_once, runs)}
    if jax.default_backend() != "cpu":  # on CPU host and device share memory: transfers may be zero-copy
        host = np.ones(n_bytes // 4, np.float32)
        out["host_to_device"] = n_bytes / best_time(lambda: jax.device_put(host).block_until_ready(), runs)
        out["device_to_host"] = n_bytes / _fetch_time(x, runs)
    return out


def _fetch_time(x: Any, runs: int) -> float:
    """Best seconds to copy a fresh device array (not yet cached on the host) to host memory."""
    import time

    import jax

    fresh = jax.jit(lambda v: v + 1.0)
    best = float("inf")
    for _ in range(runs + 1):
        y = fresh(x).block_until_ready()
        t0 = time.perf_counter()
        jax.device_get(y)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_ceilings(matmul_n: int, bandwidth_bytes: int, dtypes: tuple[str, ...] = COMPUTE_DTYPES,
                     runs: int = 5) -> dict[str, Any]:
    """Measured matmul FLOP/s per dtype ({dtype: value or an error string where unsupported}), gptjax's own CPU
    kernels' peaks (kernel_flops) and bandwidths."""
    flops: dict[str, float | str] = {}
    for dtype in dtypes:
        try:
            flops[dtype] = matmul_flops(dtype, matmul_n, runs)
        except Exception as e:  # a dtype the platform cannot multiply is recorded, not fatal
            flops[dtype] = f"unsupported: {type(e).__name__}: {str(e)[:200]}"
    return {"matmul_n": matmul_n, "matmul_flops": flops, "kernel_flops": kernel_peaks(matmul_n, runs),
            "bandwidth_bytes": bandwidth_bytes, "bandwidth": memory_bandwidth(bandwidth_bytes, runs)}
