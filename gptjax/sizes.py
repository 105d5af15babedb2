"""The size calculator's tables: parameters, weight and KV-cache bytes per precision, FLOPs per token, side by
side for one or more model shapes (what `gptjax info` prints)."""

from __future__ import annotations

import math

from gptjax import precision as registry
from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError


def size_table(columns: list[tuple[str, GPTConfig]], seq_len: int | None = None) -> str:
    """The calculator's markdown table for one or more configs (a ratio column when there are two)."""
    rows: list[tuple[str, list[float], str]] = [
        ("n_layer / n_head / n_embd", [0] * len(columns), ""),
        ("parameters", [c.num_params() for _, c in columns], "n"),
        ("  embeddings (wte, wpe, untied head)", [c.embedding_params() for _, c in columns], "n"),
        ("  per block", [c.layer_params() for _, c in columns], "n"),
    ]
    rows += [(f"weights {p}", [_weight_bytes(c, p) for _, c in columns], "B") for p in registry.STORAGES]
    rows += [("train state fp32 (w, grad, AdamW m, v)", [16 * c.num_params() for _, c in columns], "B")]
    rows += [(f"KV cache per token {p}", [c.kv_cache_bytes_per_token(p) for _, c in columns], "B")
             for p in registry.KV_CACHES]  # the KV cache's own storages (not the weights')
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
            cells = [human(v, kind) for v in values]
        known = kind and values[0] and not any(math.isnan(v) for v in values)
        ratio = [f"{values[1] / values[0]:.3f}x" if known else ""] if len(columns) == 2 else []
        lines.append("| " + " | ".join([name, *cells, *ratio]) + " |")
    lines.append("\nFLOPs = 2·N_mm + 2·D·V + 2·L·D·(T+1) per token (causal attention counted exactly); "
                 f"training = 3 × forward. {'; '.join(map(_scaled_note, registry.STORAGES.values()))}.")
    return "\n".join(lines)


def _scaled_note(storage: registry.Storage) -> str:
    """What a storage's weights are: its values, and a scaled one's fp32 scales."""
    if not storage.scaled:
        return f"{storage.name} = {storage.dtype}"
    values = f"{storage.dtype} matmul weights" if storage.bits == 8 else f"{8 // storage.bits} matmul weights per byte"
    group = f" and group of {storage.group_size} inputs" if storage.group_size else ""
    return f"{storage.name} = {values} + an fp32 scale per output channel{group}"


def _weight_bytes(config: GPTConfig, storage: str) -> float:
    """The weight bytes of a storage, or NaN where the shape cannot take it (int4 on widths no group divides)."""
    try:
        return config.weight_bytes(storage)
    except GptjaxError:
        return float("nan")


def human(value: float, kind: str) -> str:
    """A count ("n": 1,234), bytes ("B": 1.50 KiB, powers of 1024) or FLOPs ("F": 1.50 GFLOP, powers of 1000);
    NaN (not applicable) as "n/a"."""
    if math.isnan(value):
        return "n/a"
    if kind == "n":
        return f"{int(value):,}"
    units = ["", "K", "M", "G", "T", "P"]
    step = 1024 if kind == "B" else 1000
    i = 0
    while abs(value) >= step and i < len(units) - 1:
        value, i = value / step, i + 1
    suffix = {"B": ("B" if i == 0 else "iB"), "F": "FLOP"}[kind]
    return f"{value:,.2f} {units[i]}{suffix}" if i else f"{value:,.0f} {suffix}"
