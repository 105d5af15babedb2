"""The matmul formulations of the precision modes, and the one table (FORMULATIONS, at the end) that picks them by
(weight storage, activations, gptjax's CPU kernels): each function was chosen per platform by measurement
(`gptjax bench --precision ...` and `gptjax quantize --report`; docs/precision.md). A storage without an entry of
its own computes with the generic one of its kind: XLA's dots for float weights, and for scaled 8-bit values
(int8, fp8, ...) their conversion to float32 inside the jitted dot, the scales applied after each group's dot.

Legend: x [..., I] activations, w [I, O] stored values (int8, ...) with float32 scales s [G, O] (G groups along
the input; per-channel quantisation is G = 1). Every function returns float32 [..., O]. The `_nk` functions take
out-major weights q [O, I] with scales s [O, G] and run gptjax's CPU kernels (cpu_kernels.available()).

What XLA:CPU does (measured on the gpt2 shape, decode): a dot whose int8 (or bf16) operand is converted to
float32 inside the jit materialises the converted weight on every call (9 bytes of traffic per int8 weight
instead of fp32's 4), its int8 x int8 -> int32 dots are compute-bound, not bandwidth-bound, and the decode
loop hoists loop-invariant converts out of the loop (float32 copies written per decode call). So on CPU the
weight-only int8 matmul feeds the int8 dot a two-term int8 expansion of the activations (hi + lo / 254 of
each token's scale: 16-bit fixed point, error <= max|x| / 64516, far below the weights' own rounding), and
where gptjax's CPU kernels are built that dot is theirs (one pass over the int8 bytes); the XLA formulations
below are the fallback. On GPU/TPU XLA fuses the convert into the GEMM, so the plain
dequantise-inside-the-dot formulation is used there.

int4: p [I/2, O] packed nibbles (gptjax.quantize.pack_int4: input 2j in the low nibble of byte j, 2j + 1 in the
high one, each + 8) with scales s [G, O]. Its XLA formulation unpacks and dequantises inside the jitted dot (fused
into the GEMM on GPU/TPU; materialised per call on XLA:CPU, the fallback where the kernels cannot run); on
gptjax's CPU kernels x's two int8 terms meet the packed bytes directly (int4_matmul_nk).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from gptjax.backends import cpu_kernels
from gptjax.errors import GptjaxError
from gptjax.precision import Storage


def dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., I] @ w [I, O] in w's dtype, accumulated and returned in float32."""
    if w.dtype != jnp.float32:
        return _two_row(lambda a: jnp.matmul(a, w, preferred_element_type=jnp.float32), x)
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _two_row(matmul, x: jax.Array) -> jax.Array:
    """matmul(x), run on [x, 0] when x is a single row on CPU: XLA:CPU's bf16 and int8 dots are faster (by
    10-25% in the gpt2 decode) with two rows than with one."""
    if x.size != x.shape[-1] or jax.default_backend() != "cpu":
        return matmul(x)
    return matmul(jnp.stack([x, jnp.zeros_like(x)]))[0]


def table_lookup(table: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The rows table[tokens] as float32 (XLA's gather), and the table itself for the head."""
    return table[tokens].astype(jnp.float32), table


def table_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., D] @ w [V, D].T in w's dtype, float32 out (the tied head, in XLA's dot)."""
    return jnp.einsum("...d,vd->...v", x, w, preferred_element_type=jnp.float32)


def kernel_lookup(table: jax.Array, ids: jax.Array | slice) -> tuple[jax.Array, jax.Array]:
    """table[ids] in float32 for a bfloat16 table, gathered by gptjax's CPU kernel (and the table for the head):
    XLA:CPU gathers a bfloat16 table from a float32 copy of all of it, which it hoists out of the decode loop (gpt2's
    wte: 150 MB written, about 40 ms, per decode call; one-token stream chunks took 48 ms instead of 8)."""
    rows = cpu_kernels.bf16_rows(table, jnp.arange(*ids.indices(len(table))) if isinstance(ids, slice) else ids)
    return rows, table


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 of x [..., K] with one float32 scale per row [..., 1] (an all-zero row gets scale 1)."""
    amax = jnp.abs(x).max(-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float32)
    return jnp.clip(jnp.rint(x / scale), -127, 127).astype(jnp.int8), scale


def per_token(x: jax.Array, above: int | None) -> bool:
    """Whether a pass over x [..., T, I] has more than `above` tokens per sequence (a [B, I] input is one token per
    sequence; None: never): then a mode with Mode.per_token_above multiplies with per-token int8 activations."""
    return above is not None and x.ndim >= 3 and x.shape[-2] > above


# ---- scaled weights in XLA's layout: w [I, O] as stored (packed int4: [I/2, O]), scales s [G, O] ----------------
def int8_matmul(x: jax.Array, w: jax.Array, s: jax.Array) -> jax.Array:
    """Weight-only int8: sum over groups g of (x_g @ q_g) * s_g; per channel on CPU, one int8 dot over x's two
    int8 terms."""
    q = w.reshape(s.shape[0], -1, s.shape[1])  # [G, I/G, O]
    if q.shape[0] == 1 and jax.default_backend() == "cpu":
        return _split_int8_dot(x, q[0]) * s[0]
    return _dequantized_dot(x, q, s)


def dequantized_matmul(x: jax.Array, w: jax.Array, s: jax.Array) -> jax.Array:
    """Weight-only, any 8-bit values (fp8, ...): converted to float32 inside the jitted dot, the scales applied
    after each group's dot."""
    return _dequantized_dot(x, w.reshape(s.shape[0], -1, s.shape[1]), s)


def _dequantized_dot(x: jax.Array, q: jax.Array, s: jax.Array) -> jax.Array:
    """The values q [G, I/G, O] converted to float32 inside the jitted dot, the scales applied after each group's
    dot."""
    if q.shape[0] == 1:
        return jnp.matmul(x, q[0].astype(jnp.float32)) * s[0]
    xg = x.reshape(*x.shape[:-1], q.shape[0], -1)  # [..., G, I/G]
    return (jnp.einsum("...gi,gio->...go", xg, q.astype(jnp.float32)) * s).sum(-2)


def _split_int8_dot(x: jax.Array, q: jax.Array) -> jax.Array:
    """x [..., I] @ q [I, O] (int8) as one int8 x int8 -> int32 dot over x's two-term int8 expansion."""
    terms, sx = split_rows(x)
    return _join(jnp.matmul(terms, q, preferred_element_type=jnp.int32), sx)


def split_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., I] as two int8 terms [2, ..., I] and a float32 scale per row [..., 1]:
    x = sx * (hi + lo / 254), |error| <= sx / 508 = max|x| / 64516 (16-bit fixed point)."""
    amax = jnp.abs(x).max(-1, keepdims=True)
    sx = jnp.where(amax > 0, amax / 127.0, 1.0)  # [..., 1]
    a = x / sx  # in [-127, 127]
    hi = jnp.rint(a)
    lo = jnp.rint((a - hi) * 254.0)  # (a - hi) in [-0.5, 0.5] -> [-127, 127]
    return jnp.stack([hi, lo]).astype(jnp.int8), sx


def _join(acc: jax.Array, sx: jax.Array) -> jax.Array:
    """The float32 [..., O] of the dots [2, ..., O] (int32 sums, or scaled float32) of split_rows' two terms."""
    acc = acc.astype(jnp.float32)
    return (acc[0] + acc[1] / 254.0) * sx


def per_token_matmul(x: jax.Array, w: jax.Array, s: jax.Array) -> jax.Array:
    """Dynamic W8A8: each token's activations (per group) quantised to int8 with their own scale, an
    int8 x int8 -> int32 dot, then both scales: sum over g of (xq_g @ q_g) * sx_g * s_g."""
    q = w.reshape(s.shape[0], -1, s.shape[1])  # [G, I/G, O]
    if q.shape[0] == 1:
        xq, sx = quantize_rows(x)  # [..., I] int8, [..., 1]
        acc = _two_row(lambda a: jnp.matmul(a, q[0], preferred_element_type=jnp.int32), xq)
        return acc.astype(jnp.float32) * sx * s[0]
    xq, sx = quantize_rows(x.reshape(*x.shape[:-1], q.shape[0], -1))  # [..., G, I/G] int8, [..., G, 1]
    acc = jnp.einsum("...gi,gio->...go", xq, q, preferred_element_type=jnp.int32)  # [..., G, O]
    return (acc.astype(jnp.float32) * sx * s).sum(-2)


def unpack_int4(p: jax.Array, axis: int) -> jax.Array:
    """The int8 values in [-8, 7] of uint8 bytes p packed along axis (which doubles)."""
    axis %= p.ndim
    pairs = jnp.stack([p & 0xF, p >> 4], axis + 1)  # [..., n, 2, ...]
    shape = (*p.shape[:axis], 2 * p.shape[axis], *p.shape[axis + 1:])
    return pairs.reshape(shape).astype(jnp.int8) - 8


def int4_matmul(x: jax.Array, p: jax.Array, s: jax.Array) -> jax.Array:
    """Weight-only int4: x [..., I] @ p [I/2, O] unpacked, sum over groups g of (x_g @ q_g) * s_g (as int8's
    grouped formulation, on the unpacked values)."""
    q = unpack_int4(p, 0)  # [I, O]
    return _dequantized_dot(x, q.reshape(s.shape[0], -1, q.shape[-1]), s)


# ---- scaled [V, D] tables (values [V, D], packed int4 [V, D/2]) with scales s [V, G]: rows and the tied head ----
def scaled_rows(q: jax.Array, s: jax.Array, tokens: jax.Array) -> jax.Array:
    """The float32 rows [..., D] of tokens [...] in a table of 8-bit values (int8, fp8, ...)."""
    return _scale_rows(q[tokens].astype(jnp.float32), s, tokens)


def int4_rows(p: jax.Array, s: jax.Array, tokens: jax.Array) -> jax.Array:
    """The float32 rows [..., D] of tokens in a packed int4 table: gathered packed, unpacked after the gather."""
    return _scale_rows(unpack_int4(p[tokens], -1).astype(jnp.float32), s, tokens)


def _scale_rows(rows: jax.Array, s: jax.Array, tokens: jax.Array) -> jax.Array:
    return (rows.reshape(*rows.shape[:-1], s.shape[1], -1) * s[tokens][..., None]).reshape(rows.shape)


def dequantized_matmul_t(x: jax.Array, q: jax.Array, s: jax.Array) -> jax.Array:
    """x [..., D] @ q.T for a [V, D] table of 8-bit values with scales s [V, G] per row and group: float32 [..., V]
    (the tied LM head; dequantised inside the dot, which measured as fast as fp32's head here)."""
    V, G = s.shape
    if G == 1:
        return jnp.einsum("...d,vd->...v", x, q.astype(jnp.float32)) * s[:, 0]
    xg = x.reshape(*x.shape[:-1], G, -1)  # [..., G, D/G]
    return (jnp.einsum("...gi,vgi->...vg", xg, q.reshape(V, G, -1).astype(jnp.float32)) * s).sum(-1)


def int4_matmul_t(x: jax.Array, p: jax.Array, s: jax.Array) -> jax.Array:
    """x [..., D] @ table.T for a packed int4 [V, D/2] table with scales s [V, G]: float32 [..., V]."""
    return dequantized_matmul_t(x, unpack_int4(p, 1), s)


# ---- Out-major int8 weights [O, I] on gptjax's CPU kernels (cpu_kernels.available()): per channel, the same
# numbers as the int8 formulations above on CPU (exact int32 sums). Out-major bfloat16 weights call
# cpu_kernels.bf16_matmul directly.
def int8_matmul_nk(x: jax.Array, q: jax.Array, s: jax.Array) -> jax.Array:
    """Weight-only int8 over q [O, I] with scales s [O, G]: x's two int8 terms through the int8 kernel (per
    channel: exact int32 sums, as int8_matmul on CPU) or the grouped kernel."""
    terms, sx = split_rows(x)
    if s.shape[1] == 1:
        return _join(cpu_kernels.int8_matmul(terms, q), sx) * s[:, 0]
    return _join(cpu_kernels.int8_grouped_matmul(terms, q, s, jnp.ones((*terms.shape[:-1], s.shape[1]))), sx)


def int4_matmul_nk(x: jax.Array, p: jax.Array, s: jax.Array) -> jax.Array:
    """Weight-only int4 over packed p [O, I/2] with scales s [O, G]: x's two int8 terms through the int4 kernel
    (the nibbles unpacked in registers; each group's exact int32 sum times its scale)."""
    terms, sx = split_rows(x)
    return _join(cpu_kernels.int4_matmul(terms, p, s), sx)


def per_token_matmul_nk(x: jax.Array, q: jax.Array, s: jax.Array) -> jax.Array:
    """Dynamic W8A8 over q [O, I] with scales s [O, G]: x quantised per token (and group), then the kernel."""
    if s.shape[1] == 1:
        xq, sx = quantize_rows(x)
        return cpu_kernels.int8_matmul(xq, q).astype(jnp.float32) * sx * s[:, 0]
    xq, sx = quantize_rows(x.reshape(*x.shape[:-1], s.shape[1], -1))  # [..., G, I/G], [..., G, 1]
    return cpu_kernels.int8_grouped_matmul(xq.reshape(x.shape), q, s, sx[..., 0])


# ---- the table ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Formulation:
    """How weights of one storage multiply, and how its tables give rows. Float storages: dense(x in w's dtype,
    w [I, O]), head(x, table [V, D]), lookup(table, ids) -> (float32 rows, the table for the head). Scaled ones
    (values + float32 scales): dense(x float32, w, s), head(x float32, table, s), lookup(table, s, tokens) -> float32
    rows. out_major: the dense weights are stored [O, I] (scales [O, G]) for gptjax's CPU kernels, not [I, O]."""

    dense: Callable[..., jax.Array]
    head: Callable[..., jax.Array] | None = None  # None: the storage's tables use the weight-only formulation's
    lookup: Callable[..., Any] | None = None
    out_major: bool = False


FLOAT, SCALED = "float", "scaled"  # the generic entries: any float storage, any scaled storage of 8-bit values
_XLA_FLOAT = Formulation(dot, table_dot, table_lookup)
_BF16_NK = Formulation(cpu_kernels.bf16_matmul, cpu_kernels.bf16_matmul, kernel_lookup, out_major=True)
_INT8_NK = Formulation(int8_matmul_nk, int8_matmul_nk, scaled_rows, out_major=True)
_INT4_NK = Formulation(int4_matmul_nk, int4_matmul_nk, int4_rows, out_major=True)

# (storage, activations (a Mode's compute_dtype; a float storage computes in its own dtype), gptjax's CPU kernels)
FORMULATIONS: dict[tuple[str, str, bool], Formulation] = {
    (FLOAT, "fp32", False): _XLA_FLOAT,
    (FLOAT, "bf16", False): _XLA_FLOAT,  # x cast to bfloat16, float32 accumulation
    ("bf16", "bf16", True): _BF16_NK,
    (SCALED, "fp32", False): Formulation(dequantized_matmul, dequantized_matmul_t, scaled_rows),
    ("int8", "fp32", False): Formulation(int8_matmul, dequantized_matmul_t, scaled_rows),
    ("int8", "fp32", True): _INT8_NK,
    ("int8", "int8", False): Formulation(per_token_matmul),  # per-token int8 activations (the head stays weight-only)
    ("int8", "int8", True): Formulation(per_token_matmul_nk, out_major=True),
    ("int4", "fp32", False): Formulation(int4_matmul, int4_matmul_t, int4_rows),
    ("int4", "fp32", True): _INT4_NK,
}


def formulation(storage: Storage, activations: str, kernels: bool = False) -> Formulation:
    """The formulation of weights in storage with these activations: on gptjax's CPU kernels (kernels) the
    storage's own kernel entry where it has one, else its XLA entry, else the generic one of its kind."""
    kind = SCALED if storage.scaled else FLOAT
    for key in ((storage.name, activations, kernels), (storage.name, activations, False), (kind, activations, False)):
        if key in FORMULATIONS:
            return FORMULATIONS[key]
    raise GptjaxError(f"no matmul formulation for {storage.name} weights with {activations} activations; "
                      f"known: {sorted(FORMULATIONS)}")
