"""bf16 training on gptjax's CPU kernels: the matmuls of the forward and backward pass (x·W, dy·Wᵀ, xᵀ·dy) as
bfloat16 x bfloat16 -> float32 kernel calls (gptjax_bf16_matmul, GEMM-shaped from 128 rows) through
`jax.custom_vjp`. XLA:CPU runs a bfloat16 dot by converting both operands to float32 (jax 0.10.2), so the
training step's `compute_dtype="bf16"` ran at float32's rate plus the converts.

The conversion step is `training_layers`: create_state builds the training model with the weight modules it
returns, whose matmuls take a formulation chosen by the weights' dtype: the bfloat16 copy the train step makes
(compute_dtype="bf16", train.compute_copy) runs the kernels, float32 weights (evaluation, export) XLA's dots, as
before. Master weights and the AdamW state stay float32 (gptjax.train). Without the kernels (another backend, a CPU without
AVX512_BF16, GPTJAX_CPU_KERNELS=0) or with a mesh (the kernels are not partitioned: XLA would gather every
operand), the float layers and XLA's path stay.

Numerics match XLA's bf16 path (and PyTorch's autocast): operands rounded to bfloat16, products summed in
float32; the cotangents dy are rounded to bfloat16 for the two backward matmuls, and the weight gradient
arrives in the weight copy's dtype (bfloat16), as jax.grad of the bf16 copy gives it, written so by the kernel
(no float32 [K, N] per weight). The token table's lookup adds its gradient into the tied head's in place
(kernel_lookup: XLA:CPU scattered it through float32 copies of the whole [V, D] table).
Legend: x [..., K] activations, w [K, N] (Conv1D layout, Dense) or [N, K] (out-major: the tied head's [V, D]).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from gptjax.backends import cpu_kernels
from gptjax.backends.jax import lowp
from gptjax.backends.jax.model import Dense, Embedding, FloatLayers, table_dot, table_lookup


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def kernel_matmul(x: jax.Array, w: jax.Array, out_major: bool) -> jax.Array:
    """x [..., K] @ w (bfloat16, [K, N], or [N, K] when out_major) -> float32 [..., N] on the bf16 kernel, which
    reads either layout as stored (no transposed copy of w per step)."""
    return cpu_kernels.bf16_matmul(x, w) if out_major else cpu_kernels.bf16_matmul_kn(x, w)


def _forward(x: jax.Array, w: jax.Array, out_major: bool) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return kernel_matmul(x, w, out_major), (x, w)


def _backward(out_major: bool, res: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    """dx = dy·Wᵀ and dW = xᵀ·dy, each one kernel call reading W and dy in their stored layouts (only the
    activations x, and the head's dy, are transposed: dW's rows must be the kernel's rows of x)."""
    x, w = res
    dy = dy.astype(jnp.bfloat16)  # [..., N]
    dx = cpu_kernels.bf16_matmul_kn(dy, w) if out_major else cpu_kernels.bf16_matmul(dy, w)  # -> [..., K]
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # [M, K], [M, N]
    a, b = (dy2.T, x2) if out_major else (x2.T, dy2)
    dw = cpu_kernels.bf16_matmul_kn(a, b, w.dtype)  # [N, K] or [K, N], as w, rounded by the kernel as it writes
    return dx.astype(x.dtype), dw


kernel_matmul.defvjp(_forward, _backward)


@jax.custom_vjp
def kernel_lookup(table: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(rows of a bfloat16 table [V, D] at ids [...] as float32 [..., D], the table itself for the tied head
    (Embedding.tied)). The head's table gradient thus comes back here with the rows', and gptjax_bf16_rows_add adds
    the rows' into it in place: JAX would sum a scatter into a zero table with it, which XLA:CPU runs through
    float32 [V, D] copies (four on gpt2: 440 MB of the step's 720 MB of temporaries)."""
    return table[ids].astype(jnp.float32), table


def _lookup_forward(table: jax.Array, ids: jax.Array) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    return kernel_lookup(table, ids), ids


def _lookup_backward(ids: jax.Array, cotangents: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
    g_rows, g_table = cotangents  # [..., D] float32; [V, D] bfloat16: the head's gradient (zeros if untied)
    return cpu_kernels.bf16_rows_add(g_table, ids, g_rows), None


kernel_lookup.defvjp(_lookup_forward, _lookup_backward)


def dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """Dense's matmul x [..., K] @ w [K, N] -> float32: a bfloat16 w on the kernel, else XLA's (lowp.dot)."""
    return kernel_matmul(x, w, False) if w.dtype == jnp.bfloat16 else lowp.dot(x, w)


def lookup(table: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The lookup (float32 rows, the table for the head): a bfloat16 table's on the kernel, else XLA's gather."""
    return kernel_lookup(table, tokens) if table.dtype == jnp.bfloat16 else table_lookup(table, tokens)


def head_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """The tied head x [..., D] @ w [V, D].T -> float32: a bfloat16 table on the kernel, else XLA's."""
    return kernel_matmul(x, w, True) if w.dtype == jnp.bfloat16 else table_dot(x, w)


class KernelTrainingLayers(FloatLayers):
    """The float layers (same parameters, same export) whose matmuls run the bf16 kernel on bfloat16 weights."""

    def dense(self, p: dict, key: str, axes: tuple[str | None, ...], shape: tuple[int, ...], n_out: int) -> Dense:
        """The kernel module of p[key] viewed as shape, with dot as its matmul."""
        w = p[key]
        return Dense(w.reshape(*w.shape[:-2], *shape), axes, n_out, dot=dot)

    def embedding(self, p: dict, key: str, axes: tuple[str | None, ...]) -> Embedding:
        """The [V, D] table of p[key] with lookup as its lookup and head_dot as its head."""
        return Embedding(p[key], axes, head_dot=head_dot, lookup=lookup)


def training_layers(compute_dtype: str, mesh: object = None) -> FloatLayers:
    """The weight modules create_state builds the training model with: the kernels' for bf16 compute where they
    run (CPU, built, AVX512_BF16, no mesh), else the float layers (XLA's dots)."""
    if compute_dtype == "bf16" and mesh is None and cpu_kernels.available():
        return KernelTrainingLayers()
    return FloatLayers()
