"""Attention maps: what every head of every layer looks at, for one prompt, read off the NumPy oracle.

`compute` runs the oracle (backends/numpy_ref.py) with return_attention and keeps the softmax weights
A = softmax(QK^T / sqrt(K) + M) of each layer and head; `from_checkpoint` does it for a prompt and a checkpoint
directory; `to_row`/`from_row` are the JSON form (what `gptjax attention --json` writes and docs/model.md's picture
is drawn from); `plot` draws an L x H grid of the maps with the prompt's tokens on the axes.

Legend: L layers, H heads, T time (query position), S key position (S = T: no cache here).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.tokenizer import ByteTokenizer, Tokenizer, checkpoint_tokenizer
from gptjax.weights import Params, load_checkpoint, stored_precision

DECIMALS = 4  # the JSON keeps 4 decimals: a picture cannot show more, and 4 layers x 4 heads x 32^2 stay ~100 KB
LABELLED = 48  # up to this many tokens every one is named on the axes (at >= 8 pt); beyond, every n-th
SHOWN = {"\n": "\u21b5", " ": "\u2423", "\t": "\u21e5"}  # ↵ ␣ ⇥: whitespace made visible on an axis


@dataclass(frozen=True)
class AttentionMaps:
    """One prompt's attention weights [L, H, T, T] (row t: how query t spreads over keys 0..t), its tokens and
    the labels drawn for them."""

    checkpoint: str
    prompt: str
    tokens: tuple[int, ...]
    labels: tuple[str, ...]
    weights: np.ndarray  # [L, H, T, T]


def compute(params: Params, config: GPTConfig, tokens: list[int]) -> np.ndarray:
    """The oracle's attention weights of one sequence: [L, H, T, T], float64 (float32 params upcast: exact sums)."""
    from gptjax.backends.numpy_ref import gpt2

    _check_tokens(tokens, config)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    _, maps = gpt2(np.array([tokens]), p, config.n_layer, config.n_head, config.layer_norm_epsilon, True,
                   return_attention=True)  # maps: [L, B=1, H, T, T]
    return maps[:, 0]


def _check_tokens(tokens: list[int], config: GPTConfig) -> None:
    """A non-empty prompt that fits the context, in the vocabulary."""
    if not tokens:
        raise GptjaxError("the prompt is empty: give at least one token of text")
    if len(tokens) > config.n_positions:
        raise GptjaxError(f"the prompt is {len(tokens)} tokens; this model's context is {config.n_positions}")
    bad = [t for t in tokens if not 0 <= t < config.vocab_size]
    if bad:
        raise GptjaxError(f"token id(s) {bad[:5]} outside the vocabulary [0, {config.vocab_size})")


def from_checkpoint(path: str | os.PathLike, prompt: str) -> AttentionMaps:
    """The attention maps of a float checkpoint directory (runs/<timestamp>/model, or
    tests/fixtures/trained_byte_tiny) on a text prompt, tokenized as the checkpoint's tokenizer does."""
    if not prompt:
        raise GptjaxError("--prompt is empty: give some text to look at")
    config, params = load_checkpoint(path)
    precision = stored_precision(path)
    if precision != "fp32":
        raise GptjaxError(f"{path} is stored in {precision}: attention maps are read off a float (fp32) checkpoint, "
                          "the one `gptjax quantize` started from")
    tokenizer = checkpoint_tokenizer(path, config.vocab_size)
    if tokenizer is None:
        raise GptjaxError(f"{path} has no tokenizer files and a {config.vocab_size}-token vocabulary: no way "
                          "to turn --prompt into tokens")
    tokens = tokenizer.encode(prompt)
    weights = compute(params, config, tokens)
    return AttentionMaps(str(path), prompt, tuple(tokens), token_labels(tokenizer, tokens), weights)


def token_labels(tokenizer: Tokenizer, tokens: list[int]) -> tuple[str, ...]:
    """Each token as a short axis label: its text with whitespace made visible, a lone non-UTF-8 byte as hex."""
    labels = []
    for t in tokens:
        text = f"x{t:02x}" if isinstance(tokenizer, ByteTokenizer) and t >= 0x80 else tokenizer.decode([t])
        labels.append("".join(SHOWN.get(c, c) for c in text))
    return tuple(labels)


def to_row(maps: AttentionMaps) -> dict[str, Any]:
    """The JSON row of one prompt's maps (weights rounded to DECIMALS)."""
    L, H = maps.weights.shape[:2]
    return {"kind": "attention", "checkpoint": maps.checkpoint, "prompt": maps.prompt, "tokens": list(maps.tokens),
            "labels": list(maps.labels), "layers": L, "heads": H,
            "weights": np.round(maps.weights, DECIMALS).tolist()}  # [L][H][T][T]


def from_row(row: dict[str, Any]) -> AttentionMaps:
    """The maps of a row that to_row wrote."""
    return AttentionMaps(row["checkpoint"], row["prompt"], tuple(row["tokens"]), tuple(row["labels"]),
                         np.asarray(row["weights"], dtype=np.float64))


def data_hash(row: dict[str, Any]) -> str:
    """The first 12 hex digits of the sha256 of a row's canonical JSON: the name a picture of it carries."""
    return hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()[:12]


def plot(maps: AttentionMaps, path: str | os.PathLike) -> Path:
    """Draw the L x H grid of attention maps (rows: layers, columns: heads; x: key, y: query) into a PNG."""
    plt = pyplot()
    L, H, T, _ = maps.weights.shape
    cell = max(2.4, 0.16 * min(T, LABELLED))  # inches: room for one 8 pt (0.11 in) label per token
    fig, axes = plt.subplots(L, H, figsize=(cell * H + 2.0, cell * L + 1.6), squeeze=False, layout="constrained")
    for (layer, head), ax in np.ndenumerate(axes):
        image = ax.imshow(maps.weights[layer, head], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        _label_axes(ax, maps.labels, bottom=layer == L - 1, left=head == 0)
        ax.set_title(f"layer {layer}, head {head}", fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight (row: query, sums to 1)")
    fig.suptitle(f"attention of {Path(maps.checkpoint).name} on a {T}-token prompt", fontsize=12)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, metadata={"Software": None})  # no version stamp: the same data, the same bytes
    plt.close(fig)
    return out


def _label_axes(ax: Any, labels: tuple[str, ...], bottom: bool, left: bool) -> None:
    """Token labels on the outer axes (every token up to LABELLED of them), positions otherwise."""
    step = 1 if len(labels) <= LABELLED else -(-len(labels) // LABELLED)
    ticks = list(range(0, len(labels), step))
    names = [labels[i] for i in ticks]
    ax.set_xticks(ticks, names if bottom else [], fontsize=8, rotation=0 if max(map(len, names)) <= 1 else 90)
    ax.set_yticks(ticks, names if left else [], fontsize=8)
    if bottom:
        ax.set_xlabel("key (attended to)", fontsize=9)
    if left:
        ax.set_ylabel("query", fontsize=9)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend; a clear error without the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GptjaxError("drawing pictures needs matplotlib: pip install 'gptjax[tour]'") from None
    return plt
