"""The precision registry: every run mode, weight storage and KV-cache storage, declared once.

A run mode (what `--precision` takes) runs weights kept in one storage, with a default KV cache. Everything
else derives its lists from these three tables: the backends' `precision`/`kv_cache` options, the size
calculator (`GPTConfig.weight_bytes`), the checkpoint loader, the CLI choices and the benchmark lists.

The code of a mode lives beside the code it extends, in tables keyed by the names declared here (a test fails
when an entry has no code): `gptjax.quantize.QUANTISERS` (scaled storage -> quantiser; CONVERTERS: storage ->
conversion of float32 params), `gptjax.backends.jax.lowp.FORMULATIONS` ((storage, compute_dtype, CPU kernels) ->
matmul formulation, with generic entries for any float storage and any scaled storage of 8-bit values),
`gptjax.backends.numpy_ref.GROUP_DOTS` (compute_dtype -> the oracle's activations), and
`gptjax.backends.jax.kv.KV_FORMATS` and `gptjax.backends.numpy_ref.CACHES` (KV storage -> how a cache holds
values). Both backends build a mode's weight modules from its entry (convert.ModeLayers, numpy_ref.stand_in), with
no class per mode. This module imports nothing of gptjax but its error type, so anything may read it.

Adding a weight-only mode is: a Storage and a Mode here, its quantiser in gptjax.quantize, its safetensors dtype
code (gptjax.safetensors_io) if the file format needs a new one, and its tests; a formulation of its own in
lowp.FORMULATIONS only where the generic one is not good enough.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gptjax.errors import GptjaxError

if TYPE_CHECKING:
    from gptjax.config import GPTConfig

SCALE_BYTES = 4  # a float32 scale per output channel (and group) of a scaled weight, per head of a KV entry
INT4_GROUP_SIZES = (32, 64, 128)  # the group sizes int4 takes (inputs per scale); its default is the Storage's
# Weight-only int8 runs a pass of more than this many tokens per sequence (prefill, scoring) as w8a8 does, with each
# token's activations quantised to int8 (one int8 x int8 dot where 16-bit activations take two; docs/precision.md
# measures what it costs in logit error); decode and speculative verification (k + 1 <= 17 tokens) keep 16-bit
# activations. Both backends apply it to the tokens they are given, the JAX backend to a batch padded to its length
# bucket, which is more than 64 exactly when the longest sequence is (decode.bucket_length), so they agree.
INT8_PER_TOKEN_ABOVE = 64
PER_TOKEN = "int8"  # the compute_dtype a pass longer than a Mode's per_token_above runs in: per-token int8 activations


@dataclass(frozen=True)
class Storage:
    """How weights are stored: the dtype of their values, and whether the matmul weights carry float32 scales
    (then only they take that dtype; biases, LayerNorm and wpe stay float32). Sub-byte values (bits < 8) are
    packed 8 // bits to a byte along the contracted axis; such a storage is always grouped (group_size: its
    default), and with keep_head its tied embedding/LM head is stored in head_storage instead."""

    name: str
    dtype: str  # NumPy dtype name of the stored values
    value_bytes: int
    scaled: bool = False
    bits: int = 8  # bits per value of a scaled storage (4: two values per byte)
    group_size: int | None = None  # default inputs per scale (None: one scale per output channel)
    head_storage: str = "fp32"  # the head's storage under keep_head

    def weight_bytes(self, config: GPTConfig, group_size: int | None = None, keep_head: bool = False) -> int:
        """Bytes of a model's weights in this storage (the tied head counted once), quantised with group_size
        (None: the storage's default) and keep_head."""
        if not self.scaled:
            return self.value_bytes * config.num_params()
        D, F, V, L = config.n_embd, config.mlp_width, config.vocab_size, config.n_layer
        G = _group_size(self.name, group_size, (D, F))
        heads = (1 if config.tie_word_embeddings else 2) * V * D  # wte (and lm_head) values
        blocks = config.matmul_params(include_head=False)
        per_in = ((D, 3 * D + D + F), (F, D))  # (input width, outputs): c_attn, attn.c_proj, c_fc; mlp.c_proj
        scales = L * sum(outs * (n // G if G else 1) for n, outs in per_in)
        body = blocks * self.bits // 8 + SCALE_BYTES * scales + 4 * (config.num_params() - blocks - heads)
        rows = heads // D  # one scale per token row (and group of D/G columns)
        if keep_head:
            return body + STORAGES[self.head_storage].table_bytes(heads, rows)
        return body + heads * self.bits // 8 + SCALE_BYTES * rows * (D // G if G else 1)

    def table_bytes(self, values: int, rows: int) -> int:
        """Bytes of a [rows, values / rows] table in this storage, scaled per row (the head under keep_head)."""
        if not self.scaled:
            return self.value_bytes * values
        return values * self.bits // 8 + SCALE_BYTES * rows


@dataclass(frozen=True)
class Mode:
    """A run mode: the storage its weights are in, its default KV cache, whether `gptjax train` runs it, the
    dtype its matmuls compute in (what benchmarks report), and a line for --help.

    compute_dtype names the activations' formulation both backends implement for any storage: "fp32" (float32
    activations: weight-only for a scaled storage), "bf16" (activations rounded to bfloat16, as the weights) or
    "int8" (each token's activations quantised to int8, an int8 x int8 -> int32 dot). Token tables (the tied head)
    of a scaled storage always multiply weight-only. per_token_above: a pass of more than this many tokens per
    sequence computes as PER_TOKEN ("int8") instead (None: never)."""

    name: str
    storage: str
    kv_cache: str
    trains: bool
    compute_dtype: str
    description: str
    tolerance: float  # max |logits - float32 oracle| / max(1, max |oracle|) a correct implementation stays within
    per_token_above: int | None = None

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


def _group_size(storage_name: str, size: int | None, widths: tuple[int, ...]) -> int | None:
    return group_size(storage_name, size, widths)  # for Storage.weight_bytes, whose argument shadows the name


STORAGES: dict[str, Storage] = {s.name: s for s in (
    Storage("fp32", "float32", 4),
    Storage("bf16", "bfloat16", 2),
    Storage("int8", "int8", 1, scaled=True),  # symmetric, per output channel (or group of inputs)
    # symmetric per group of G inputs (default chosen by measurement: docs/precision.md), two values per byte;
    # keep_head stores the tied embedding/LM head int8 per row instead
    Storage("int4", "uint8", 1, scaled=True, bits=4, group_size=64, head_storage="int8"),
    # float8 e4m3 (1 sign, 4 exponent, 3 mantissa bits, finite to +-448), symmetric per output channel (or group)
    Storage("fp8", "float8_e4m3fn", 1, scaled=True),
)}

MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("fp32", "fp32", "fp32", trains=True, compute_dtype="fp32", tolerance=1e-3,
         description="float32 weights and matmuls"),
    Mode("bf16", "bf16", "bf16", trains=True, compute_dtype="bf16", tolerance=5e-2,
         description="bfloat16 weights, bfloat16 x bfloat16 matmuls accumulated in float32"),
    Mode("int8", "int8", "fp32", trains=False, compute_dtype="fp32", tolerance=1e-1,
         per_token_above=INT8_PER_TOKEN_ABOVE,
         description="int8 weights with float32 scales, float activations (weight-only; a prefill of more than 64 "
                     "tokens quantises them per token, as w8a8)"),
    Mode("w8a8", "int8", "fp32", trains=False, compute_dtype="int8", tolerance=1e-1,
         description="int8 weights and per-token int8 activations, int8 x int8 -> int32 matmuls"),
    Mode("int4", "int4", "fp32", trains=False, compute_dtype="fp32", tolerance=3e-1,
         description="int4 weights (two per byte) with a float32 scale per group of G inputs (weight-only)"),
    Mode("fp8", "fp8", "fp32", trains=False, compute_dtype="fp32", tolerance=1e-1,
         description="float8 e4m3 weights with a float32 scale per output channel, float activations (weight-only)"),
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


def weight_bytes(config: GPTConfig, precision: str, group_size: int | None = None, keep_head: bool = False) -> int:
    """Bytes of the weights of a storage or of a run mode (w8a8: its int8 storage), quantised with group_size
    (None: the storage's default) and keep_head."""
    if precision not in STORAGES and precision not in MODES:
        raise GptjaxError(f"precision={precision!r}; allowed: {', '.join(dict.fromkeys([*STORAGES, *MODES]))}")
    return STORAGES[precision if precision in STORAGES else MODES[precision].storage].weight_bytes(
        config, group_size, keep_head)


def group_size(storage_name: str, group_size: int | None, widths: tuple[int, ...] = ()) -> int | None:
    """The group size a storage quantises with (None: one scale per output channel). int4's must be one of
    INT4_GROUP_SIZES; None means its default, or where that does not divide every input width given, the largest
    allowed one that does (width 32 models: 32). Whether an explicit one divides the widths is checked on use."""
    store = STORAGES[storage_name]
    if store.bits >= 8:
        return group_size
    if group_size is None:
        fits = [g for g in INT4_GROUP_SIZES if all(n % g == 0 for n in widths)]
        if not fits:
            raise GptjaxError(f"{store.name} needs input widths divisible by a group size of "
                              f"{', '.join(map(str, INT4_GROUP_SIZES))}; got {', '.join(map(str, widths))}")
        return store.group_size if store.group_size in fits else max(fits)
    if isinstance(group_size, bool) or group_size not in INT4_GROUP_SIZES:
        allowed = ", ".join(map(str, INT4_GROUP_SIZES))
        raise GptjaxError(f"group_size={group_size!r} for {store.name}; allowed: {allowed}")
    return group_size


def kv_cache_bytes_per_token(config: GPTConfig, kind: str) -> int:
    """Bytes of one token's keys and values in every layer, stored as kind."""
    if kind not in KV_CACHES:
        raise GptjaxError(f"precision={kind!r}; allowed: {', '.join(KV_CACHES)}")
    return KV_CACHES[kind].bytes_per_token(config)


def training_modes() -> tuple[str, ...]:
    """The run modes `gptjax train` computes in (its compute_dtype choices)."""
    return tuple(m.name for m in MODES.values() if m.trains)
