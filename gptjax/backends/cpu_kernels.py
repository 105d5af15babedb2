"""gptjax's CPU matmul kernels (gptjax/_kernels/cpu_matmul.cc), called from jitted code through the XLA FFI.

XLA:CPU has no fast path for int8 or bfloat16 weights (it converts them to float32, materialised or hoisted
out of the decode loop), so reduced precision ran slower than float32 there. These kernels read the int8 /
bfloat16 weight bytes once per call, stored out-major [N, K], and multiply with AVX512-VNNI / AVX512_BF16:
  int8_matmul(x int8 [..., K], w int8 [N, K]) -> int32 [..., N]: exactly XLA's int8 dot (integer sums); from 64
  rows of x on (prefill) a GEMM over weight panels packed per call (gptjax/_kernels/gemm_int8.cc), same integers.
  int8_grouped_matmul(x, w, ws [N, G], xs [..., G]) -> float32 [..., N]: per group of K/G inputs, the exact int32
  sum times both scales, summed over groups in float32.
  int4_matmul(x int8 [..., K], w uint8 [N, K/2] (packed int4, gptjax.quantize.pack_int4), ws [N, G]) -> float32
  [..., N]: per group of K/G inputs the exact int32 sum, times its scale, summed in float32; the nibbles are
  unpacked in registers (gptjax/_kernels/cpu_int4.cc), never into an int8 or float copy of w.
  bf16_matmul(x bf16 [..., K], w bf16 [N, K]) -> float32 [..., N]: float32 accumulation (in another order);
  GEMM-shaped (packed weight panels, gemm_bf16.cc) from 128 rows of x, GEMV-shaped below (decode).
  bf16_matmul_kn(x bf16 [..., K], w bf16 [K, N]) -> float32 or bfloat16 [..., N]: the GEMM over in-major
  (Conv1D) weights (a bf16 train step's x.W, and its weight gradients x^T.dy written as bfloat16).
  bf16_rows(table bf16 [V, D], ids [...]) -> float32 [..., D]: XLA:CPU gathers bfloat16 from a float32 copy of
  the whole table (hoisted out of the decode loop: a 150 MB copy per decode call for gpt2's wte).
  bf16_rows_add(base bf16 [V, D], ids [...], g float32 [..., D]) -> bfloat16 [V, D]: that lookup's gradient added
  into base in place (the tied head's gradient), each id's rows summed in float32 and rounded once (XLA:CPU
  scatters into a float32 zero table and sums the two [V, D] gradients in float32).
  kv_scores(q [B, H, T, K], cache [B, H, S, K]) -> float32 [B, H, T, S] and kv_mix(p [B, H, T, S], cache) ->
  float32 [B, H, T, K] over a cache of int8 or of bfloat16 bits (uint16), read as stored: XLA converts the
  whole cache to float32 before its dots on every decode step.
  causal_attention(qkv [B, T, 3, H, K]) -> float32 [B, T, H, K]: the model's attention without a cache (prefill,
  scoring) fused per head (gptjax/_kernels/attention.cc): the masked half of the scores is never computed, where
  XLA runs the full [T, T] scores, mask, softmax and both dots as separate passes.
  adamw(p, g, m, v, h) -> p', m', v': one parameter's clipped AdamW update, written over p, m and v (the train
  step's optimizer, gptjax/backends/jax/adamw.py).
They are used when `status()` is "enabled": built at install (a C++ compiler), a CPU with AVX512 VNNI and BF16,
JAX on CPU, and GPTJAX_CPU_KERNELS not set to 0 (set it to 0 to measure the pure-XLA formulations).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp

ENV = "GPTJAX_CPU_KERNELS"


@functools.cache
def _module_status() -> str:
    """'enabled', or why the kernels cannot run in this process (registers them with XLA once)."""
    try:
        from gptjax import _cpu_kernels
    except ImportError as e:
        return (f"not built ({e}): `pip install .` builds them where a C++ compiler is found (`pip install -v .` "
                "shows why a build was skipped); from a source checkout, use `pip install -e .` (or `python setup.py "
                "build_ext --inplace`)")
    if not _cpu_kernels.supported():
        return "this CPU lacks AVX512 VNNI / BF16"
    _register(_cpu_kernels)
    return "enabled"


@functools.cache
def _register(module: Any) -> None:
    """Register the module's FFI handlers with XLA (once per process)."""
    for name, capsule in module.targets().items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")


def status() -> str:
    """'enabled' when the kernels run, else the reason they do not (reported in benchmarks)."""
    if os.environ.get(ENV, "1") == "0":
        return f"disabled ({ENV}=0)"
    if jax.default_backend() != "cpu":
        return f"not used on {jax.default_backend()}"
    return _module_status()


def available() -> bool:
    """Whether the JAX backend should store matmul weights out-major and run them through these kernels."""
    return status() == "enabled"


def _require() -> None:
    """Register the kernels with XLA (once), or say why they cannot run."""
    if (reason := _module_status()) != "enabled":
        raise RuntimeError(f"gptjax's CPU kernels cannot run: {reason}")


def _call(target: str, dtype: jnp.dtype, x: jax.Array, w: jax.Array, *rest: jax.Array) -> jax.Array:
    """The FFI call of target on x [..., K], w [N, K] (and rest) -> dtype [..., N]."""
    if w.ndim != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"{target}: x [..., K] and w [N, K] expected, got {x.shape} and {w.shape}")
    _require()
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((*x.shape[:-1], w.shape[0]), dtype))(x, w, *rest)


def int8_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x int8 [..., K] @ w int8 [N, K].T -> int32 [..., N], exact."""
    return _call("gptjax_int8_matmul", jnp.int32, x.astype(jnp.int8), w)


def int8_grouped_matmul(x: jax.Array, w: jax.Array, ws: jax.Array, xs: jax.Array) -> jax.Array:
    """Grouped int8: x int8 [..., K], w int8 [N, K], weight scales ws [N, G], activation scales xs [..., G] ->
    float32 [..., N] = sum over groups g of K/G inputs of ws[n, g] * xs[..., g] * (the exact int32 sum)."""
    if ws.shape[0] != w.shape[0] or xs.shape != (*x.shape[:-1], ws.shape[1]):
        raise ValueError(f"gptjax_int8_grouped_matmul: ws [N, G] and xs [..., G] expected for x {x.shape} and "
                         f"w {w.shape}, got {ws.shape} and {xs.shape}")
    return _call("gptjax_int8_grouped_matmul", jnp.float32, x.astype(jnp.int8), w, ws.astype(jnp.float32),
                 xs.astype(jnp.float32))


def int4_matmul(x: jax.Array, w: jax.Array, ws: jax.Array) -> jax.Array:
    """x int8 [..., K] @ the packed int4 w uint8 [N, K/2] with scales ws [N, G] -> float32 [..., N] = sum over
    groups g of K/G inputs of ws[n, g] * (the exact int32 sum of x * (nibble - 8))."""
    K = x.shape[-1]
    if w.ndim != 2 or ws.ndim != 2 or K != 2 * w.shape[1] or ws.shape[0] != w.shape[0] or ws.shape[1] < 1 or (
            K % ws.shape[1]):
        raise ValueError(f"gptjax_int4_matmul: x [..., K], w [N, K/2] and ws [N, G] with G dividing K expected, got "
                         f"{x.shape}, {w.shape} and {ws.shape}")
    _require()
    return jax.ffi.ffi_call("gptjax_int4_matmul", jax.ShapeDtypeStruct((*x.shape[:-1], w.shape[0]), jnp.float32))(
        x.astype(jnp.int8), w, ws.astype(jnp.float32))


def bf16_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., K] rounded to bfloat16 @ w bfloat16 [N, K].T -> float32 [..., N], float32 accumulation."""
    return _call("gptjax_bf16_matmul", jnp.float32, x.astype(jnp.bfloat16), w)


def bf16_matmul_kn(x: jax.Array, w: jax.Array, out_dtype: Any = jnp.float32) -> jax.Array:
    """x [..., K] rounded to bfloat16 @ w bfloat16 stored in-major [K, N] -> [..., N] float32, or bfloat16 (the
    float32 sums rounded to nearest even, as astype rounds) (the GEMM for any rows of x: a training step's x.W
    and x^T.dy without transposing w or dy; a bf16 weight's gradient written once in its dtype)."""
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"gptjax_bf16_matmul_kn: x [..., K] and w [K, N] expected, got {x.shape} and {w.shape}")
    if jnp.dtype(out_dtype) not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"gptjax_bf16_matmul_kn: out_dtype float32 or bfloat16 expected, got {jnp.dtype(out_dtype)}")
    _require()
    return jax.ffi.ffi_call("gptjax_bf16_matmul_kn", jax.ShapeDtypeStruct((*x.shape[:-1], w.shape[1]), out_dtype))(
        x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))


def bf16_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """float32 rows table[ids] of a bfloat16 table [V, D], indexed like table[ids] in JAX: negative ids count
    from the end, then ids are clamped to [0, V)."""
    ids = jnp.asarray(ids, jnp.int32)
    ids = jnp.where(ids < 0, ids + table.shape[0], ids)
    _require()
    return jax.ffi.ffi_call("gptjax_bf16_rows", jax.ShapeDtypeStruct((*ids.shape, table.shape[1]), jnp.float32))(
        table, ids)


def bf16_rows_add(base: jax.Array, ids: jax.Array, g: jax.Array) -> jax.Array:
    """base bfloat16 [V, D] plus the gradient of a bfloat16 table's row lookup table[ids] (bf16_rows) whose rows got
    the cotangent g [..., D]: row v is base[v] plus the float32 sum of g's rows with id v (ids as the lookup took
    them), rounded once to bfloat16; written over base (aliased: donate it, or XLA copies it first)."""
    if base.ndim != 2 or g.shape != (*jnp.shape(ids), base.shape[1]) or base.shape[0] < 1:
        raise ValueError(f"gptjax_bf16_rows_add: base [V, D] (V >= 1), ids [...] and g [..., D] expected, got "
                         f"{base.shape}, {jnp.shape(ids)} and {g.shape}")
    _require()
    return jax.ffi.ffi_call("gptjax_bf16_rows_add", jax.ShapeDtypeStruct(base.shape, jnp.bfloat16),
                            input_output_aliases={0: 0})(
        base.astype(jnp.bfloat16), jnp.asarray(ids, jnp.int32), g.astype(jnp.float32))


_KV_SUFFIX = {"int8": "int8", "uint16": "bf16"}


def kv_scores(q: jax.Array, cache: jax.Array) -> jax.Array:
    """q [B, H, T, K] . a cache [B, H, S, K] of int8 or bfloat16 bits (uint16) -> float32 [B, H, T, S]."""
    return _kv("scores", q, cache, (*q.shape[:3], cache.shape[2]))


def kv_mix(p: jax.Array, cache: jax.Array) -> jax.Array:
    """p [B, H, T, S] . a cache [B, H, S, K] of int8 or bfloat16 bits (uint16) -> float32 [B, H, T, K]."""
    return _kv("mix", p, cache, (*p.shape[:3], cache.shape[3]))


def _kv(kind: str, a: jax.Array, cache: jax.Array, out: tuple[int, ...]) -> jax.Array:
    suffix = _KV_SUFFIX.get(cache.dtype.name)
    if suffix is None or a.ndim != 4 or cache.ndim != 4:
        raise ValueError(f"gptjax_kv_{kind}: [B, H, T, .] float32 and a [B, H, S, K] int8 or uint16 cache expected, "
                         f"got {a.shape} and {cache.shape} {cache.dtype}")
    _require()
    return jax.ffi.ffi_call(f"gptjax_kv_{kind}_{suffix}", jax.ShapeDtypeStruct(out, jnp.float32))(
        a.astype(jnp.float32), cache)


def causal_attention(qkv: jax.Array) -> jax.Array:
    """Causal self-attention of qkv float32 [B, T, 3, H, K] (each token's query, key and value) -> float32
    [B, T, H, K]: softmax over keys s <= t of q[t] . k[s] / sqrt(K), times the values (gptjax/_kernels/attention.cc;
    the masked half of the scores is never computed)."""
    if qkv.ndim != 5 or qkv.shape[2] != 3:
        raise ValueError(f"gptjax_causal_attention: qkv [B, T, 3, H, K] expected, got {qkv.shape}")
    _require()
    B, T, _, H, K = qkv.shape
    return jax.ffi.ffi_call("gptjax_causal_attention", jax.ShapeDtypeStruct((B, T, H, K), jnp.float32))(
        qkv.astype(jnp.float32))


def adamw(p: jax.Array, g: jax.Array, m: jax.Array, v: jax.Array, h: jax.Array
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One parameter's clipped AdamW update (gptjax/_kernels/adamw.cc): float32 p, m, v and float32 or bfloat16
    g (read as is: a bf16 pass's gradients are not widened first) of one shape and the step's 12 scalars h -> p',
    m', v', written over p, m and v (aliased: donate them to the jitted step)."""
    if not (p.shape == g.shape == m.shape == v.shape) or h.shape != (12,):
        raise ValueError(f"gptjax_adamw: p, g, m, v of one shape and h [12] expected, got {p.shape}, {g.shape}, "
                         f"{m.shape}, {v.shape} and {h.shape}")
    _require()
    out = jax.ShapeDtypeStruct(p.shape, jnp.float32)
    return jax.ffi.ffi_call("gptjax_adamw", (out, out, out), input_output_aliases={0: 0, 2: 1, 3: 2})(
        p.astype(jnp.float32), g if g.dtype == jnp.bfloat16 else g.astype(jnp.float32), m.astype(jnp.float32),
        v.astype(jnp.float32),
        h.astype(jnp.float32))


# ---- the import-time check (gptjax/__init__.py): a source checkout whose kernels were never built ------------
def build_warning(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """What `import gptjax` says once when it runs from a source tree whose kernels are not built, on a CPU that
    would run them and with them not switched off (None otherwise). It reads files only: starting a JAX backend
    here would freeze XLA_FLAGS before e.g. the scaling study sets its host device count."""
    import importlib.util
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent
    if os.environ.get(ENV, "1") == "0" or importlib.util.find_spec("gptjax._cpu_kernels") is not None:
        return None
    if not any((package / "_kernels").glob("*.cc")) or not _cpu_has_kernel_isa(cpuinfo):
        return None  # an installed copy without kernels (no compiler at install) is status()'s to report
    installed = _installed_kernels(package)
    elsewhere = f", or start Python outside the checkout to use the installed copy in {installed}" if installed else ""
    return (f"gptjax is imported from the source tree {package}, whose CPU kernels are not built: bf16, int8 and "
            "w8a8 then run on XLA's formulations, 1.4-3.3x slower (gpt2 decode, benchmarks/results/quick-gpt2-cpu"
            f"*.jsonl). Fix: `pip install -e .` (or `python setup.py build_ext --inplace`) in {package.parent}"
            f"{elsewhere}. {ENV}=0 silences this.")


def _cpu_has_kernel_isa(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo lists AVX512 VNNI and BF16 (what the kernels need; False where it cannot be read)."""
    from pathlib import Path

    try:
        flags = Path(cpuinfo).read_text(encoding="utf-8")
    except OSError:
        return False
    return "avx512_vnni" in flags and "avx512_bf16" in flags


def _installed_kernels(package: Any) -> str | None:
    """The folder of an installed gptjax (not this tree) whose distribution carries the built kernels, if any."""
    from importlib import metadata

    try:
        files = metadata.distribution("gptjax").files or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name.startswith("_cpu_kernels") and f.name.endswith((".so", ".pyd")):
            found = f.locate().resolve().parent
            if found != package and found.is_dir():
                return str(found)
    return None
