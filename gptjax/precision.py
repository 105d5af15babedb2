"""The precision registry: every run mode, weight storage and KV-cache storage, declared once.

A run mode (what `--precision` takes) runs weights kept in one storage, with a default KV cache. Everything
else derives its lists from these three tables: the backends' `precision`/`kv_cache` options, the size
calculator (`GPTConfig.weight_bytes`), the checkpoint loader, the CLI choices and the benchmark lists.

The code of a mode lives beside the code it extends, in a dict keyed by the names declared here (a test
fails when an entry is missing one): `gptjax.quantize.CONVERTERS` (storage -> conversion of float32 params),
`gptjax.backends.jax.convert.LAYERS` and `gptjax.backends.numpy_ref.MATRICES` (mode -> weight modules), and
`gptjax.backends.jax.kv.KV_LAYERS` and `gptjax.backends.numpy_ref.CACHES` (KV storage -> cache class). This
module imports nothing of gptjax but its error type, so anything may read it.

Adding a mode (say fp8) is: a Storage (if new) and a Mode here, its conversion, its layers in each backend,
and its tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gptjax.errors import GptjaxError

if TYPE_CHECKING:
    from gptjax.config import GPTConfig

SCALE_BYTES = 4  # a float32 scale per output channel (and group) of a scaled weight, per head of a KV entry


@dataclass(frozen=True)
class Storage:
    """How weights are stored: the dtype of their values, and whether the matmul weights carry float32 scales
    (then only they take that dtype; biases, LayerNorm and wpe stay float32)."""

    name: str
    dtype: str  # NumPy dtype name of the stored values
    value_bytes: int
    scaled: bool = False

    def weight_bytes(self, config: GPTConfig) -> int:
        """Bytes of a model's weights in this storage (the tied head counted once)."""
        if not self.scaled:
            return self.value_bytes * config.num_params()
        D, F, V = config.n_embd, config.mlp_width, config.vocab_size
        heads = 1 if config.tie_word_embeddings else 2
        values = config.matmul_params(include_head=False) + heads * V * D  # the block kernels, wte (lm_head)
        scales = config.n_layer * (3 * D + D + F + D) + heads * V  # one per output channel (per token row)
        return self.value_bytes * values + SCALE_BYTES * (scales + config.num_params() - values)


@dataclass(frozen=True)
class Mode:
    """A run mode: the storage its weights are in, its default KV cache, whether `gptjax train` runs it, the
    dtype its matmuls compute in (what benchmarks report), and a line for --help."""

    name: str
    storage: str
    kv_cache: str
    trains: bool
    compute_dtype: str
    description: str
    tolerance: float  # max |logits - float32 oracle| / max(1, max |oracle|) a correct implementation stays within

    @property
    def options(self) -> tuple[str, ...]:
        """The quantisation options this mode accepts (group_size/keep_head choose how weights get scales)."""
        return ("group_size", "keep_head") if STORAGES[self.storage].scaled else ()


@dataclass(frozen=True)
class KVStorage:
    """How the KV cache stores keys and values: bytes per value, plus float32 scales per head and token."""

    name: str
    value_bytes: int
    scaled: bool = False

    def bytes_per_token(self, config: GPTConfig) -> int:
        """K and V of one token in every layer: 2·L·D values (+ 2·L·H scales)."""
        values = 2 * config.n_layer * config.n_embd * self.value_bytes
        return values + (2 * config.n_layer * config.n_head * SCALE_BYTES if self.scaled else 0)


STORAGES: dict[str, Storage] = {s.name: s for s in (
    Storage("fp32", "float32", 4),
    Storage("bf16", "bfloat16", 2),
    Storage("int8", "int8", 1, scaled=True),  # symmetric, per output channel (or group of inputs)
)}

MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("fp32", "fp32", "fp32", trains=True, compute_dtype="fp32", tolerance=1e-3,
         description="float32 weights and matmuls"),
    Mode("bf16", "bf16", "bf16", trains=True, compute_dtype="bf16", tolerance=5e-2,
         description="bfloat16 weights, bfloat16 x bfloat16 matmuls accumulated in float32"),
    Mode("int8", "int8", "fp32", trains=False, compute_dtype="fp32", tolerance=1e-1,
         description="int8 weights with float32 scales, float activations (weight-only)"),
    Mode("w8a8", "int8", "fp32", trains=False, compute_dtype="int8", tolerance=1e-1,
         description="int8 weights and per-token int8 activations, int8 x int8 -> int32 matmuls"),
)}

KV_CACHES: dict[str, KVStorage] = {k.name: k for k in (
    KVStorage("fp32", 4),
    KVStorage("bf16", 2),
    KVStorage("int8", 1, scaled=True),  # symmetric per head and token
)}


def mode(name: str) -> Mode:
    """The registry entry of a run mode; an unknown name lists the known ones."""
    if name not in MODES:
        raise GptjaxError(f"precision {name!r}; allowed: {', '.join(MODES)}")
    return MODES[name]


def storage(precision: str) -> str:
    """The weight storage a run mode runs on (w8a8 runs on int8 weights)."""
    return mode(precision).storage


def default_kv_cache(precision: str) -> str:
    """The KV-cache storage a run mode uses unless told otherwise (bf16 for bf16, else fp32)."""
    return mode(precision).kv_cache


def weight_bytes(config: GPTConfig, precision: str) -> int:
    """Bytes of the weights of a storage or of a run mode (w8a8: its int8 storage)."""
    if precision not in STORAGES and precision not in MODES:
        raise GptjaxError(f"precision={precision!r}; allowed: {', '.join(dict.fromkeys([*STORAGES, *MODES]))}")
    return STORAGES[precision if precision in STORAGES else MODES[precision].storage].weight_bytes(config)


def kv_cache_bytes_per_token(config: GPTConfig, kind: str) -> int:
    """Bytes of one token's keys and values in every layer, stored as kind."""
    if kind not in KV_CACHES:
        raise GptjaxError(f"precision={kind!r}; allowed: {', '.join(KV_CACHES)}")
    return KV_CACHES[kind].bytes_per_token(config)


def training_modes() -> tuple[str, ...]:
    """The run modes `gptjax train` computes in (its compute_dtype choices)."""
    return tuple(m.name for m in MODES.values() if m.trains)
