"""The precision trade-off, measured: for each mode on the same weights and the same validation windows, the
bytes it stores, the quality it keeps (loss, perplexity, top-1 agreement and logit error against fp32) and
the speed it gives (prefill and decode tokens/s, timed after warm-up, modes interleaved, median of runs).
The logit errors are measured on full forward passes, which run each mode's prefill formulation (the
registry's compute dtype and per-token threshold say which): they are what prefill in each mode costs. Decode runs the same formulation per row (greedy agreement sees the KV cache).

Used by `gptjax quantize --report`; timed through gptjax.timing, as `gptjax bench` is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from gptjax import precision as registry
from gptjax.backends import get_backend
from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.quantize import for_precision, weight_bytes
from gptjax.sampling import GREEDY
from gptjax.timing import interleaved_runs, median, stamps, timed
from gptjax.weights import Params


@dataclass(frozen=True)
class Mode:
    """One row of the report: a precision, its KV cache and how float32 weights are quantised."""

    precision: str = "fp32"
    kv_cache: str | None = None  # None: the precision's default
    group_size: int | None = None

    @property
    def label(self) -> str:
        """E.g. 'int8 g128 kv:int8'."""
        parts = [self.precision] + ([f"g{self.group_size}"] if self.group_size else [])
        return " ".join(parts + ([f"kv:{self.kv_cache}"] if self.kv_cache else []))

    def options(self) -> dict[str, Any]:
        """Backend options for get_backend (params are converted before, with group_size)."""
        return {"precision": self.precision} | ({"kv_cache": self.kv_cache} if self.kv_cache else {})


# every run mode the registry declares, then the variants worth a row: a group size, an int8 KV cache, and each
# sub-byte storage's other group sizes (int4: its default G is the plain row)
DEFAULT_MODES = (*(Mode(name) for name in registry.MODES), Mode("int8", group_size=64), Mode("int8", kv_cache="int8"),
                 *(Mode(name, group_size=g) for name, s in registry.STORAGES.items() if s.bits < 8
                   for g in registry.INT4_GROUP_SIZES if g != s.group_size))


@dataclass
class ModeReport:
    """What one mode measured; quality fields compare with the first (fp32) mode on the same windows."""

    mode: str
    weight_bytes: int
    kv_bytes_per_token: int
    loss: float = math.nan
    perplexity: float = math.nan
    perplexity_change: float = math.nan  # relative to fp32, e.g. +0.004 = +0.4%
    top1_agreement: float = math.nan  # fraction of positions whose argmax equals fp32's
    greedy_agreement: float = math.nan  # fraction of greedy continuation tokens (KV cache on) equal to fp32's
    max_logit_error: float = math.nan
    mean_logit_error: float = math.nan
    prefill_tokens_per_s: float = math.nan
    decode_tokens_per_s: dict[int, float] = field(default_factory=dict)  # batch size -> tokens/s

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        fields = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(self).items()}
        fields["decode_tokens_per_s"] = {str(b): t for b, t in self.decode_tokens_per_s.items()}
        return fields  # strict JSON: a quantity not measured is null, not NaN


def build(config: GPTConfig, params: Params, modes: Sequence[Mode], backend: str = "jax"
          ) -> list[tuple[Mode, Any, Any, int]]:
    """(mode, backend, prepared weights, weight bytes) per mode; quantised params are used as stored."""
    built = []
    for mode in modes:
        b = get_backend(backend, config, **mode.options())
        converted = for_precision(params, config, mode.precision, group_size=mode.group_size)
        built.append((mode, b, b.prepare(converted), weight_bytes(converted)))
    return built


def quality(built: list[tuple[Mode, Any, Any, int]], windows: np.ndarray, batch_size: int = 8
            ) -> list[dict[str, float]]:
    """Loss, perplexity, top-1 agreement and logit errors of each mode over token windows [N, T+1] (inputs
    windows[:, :-1], targets windows[:, 1:]), against the first mode."""
    sums = [dict(nll=0.0, agree=0, max_err=0.0, err=0.0) for _ in built]
    count = 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start: start + batch_size]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        reference = reference_top1 = None
        for s, (_, backend, weights, _) in zip(sums, built):
            scores = backend.score(weights, batch, top_k=1)  # each window's targets scored, and the argmax
            s["nll"] -= sum(sc.total() for sc in scores)
            top1 = np.stack([sc.top_ids[1:, 0] for sc in scores])  # [B, T]
            logits = backend.forward(weights, inputs).astype(np.float64)  # [B, T, V], for the logit errors
            if reference is None:
                reference, reference_top1 = logits, top1
            s["agree"] += int((top1 == reference_top1).sum())
            s["max_err"] = max(s["max_err"], float(np.abs(logits - reference).max()))
            s["err"] += float(np.abs(logits - reference).mean(-1).sum())
        count += targets.size
    greedy = _greedy_agreement(built, windows)
    out = []
    for s, g in zip(sums, greedy):
        loss = s["nll"] / count
        out.append({"loss": loss, "perplexity": math.exp(min(loss, 50)), "top1_agreement": s["agree"] / count,
                    "max_logit_error": s["max_err"], "mean_logit_error": s["err"] / count, "greedy_agreement": g})
    base = out[0]["perplexity"]
    for row in out:
        row["perplexity_change"] = row["perplexity"] / base - 1
    return out


def _greedy_agreement(built: list[tuple[Mode, Any, Any, int]], windows: np.ndarray, rows: int = 8) -> list[float]:
    """Per mode, the fraction of greedy tokens (prompts: the first half of up to `rows` windows, continued
    through the KV cache by up to 32 tokens) equal to the first mode's at the same position: the measure
    that sees the KV cache's precision, which a full forward pass does not use."""
    T = windows.shape[1] - 1
    prompts = [list(w[: T // 2]) for w in windows[:rows]]
    new = min(32, T - T // 2)
    outs = [b.generate(w, prompts, new, sampling=GREEDY).tokens for _, b, w, _ in built]
    total = sum(len(t) for t in outs[0])
    return [sum(a == b for r, o in zip(outs[0], out) for a, b in zip(r, o)) / total for out in outs]


def speed(built: list[tuple[Mode, Any, Any, int]], config: GPTConfig, *, prompt: int = 32, new_tokens: int = 32,
          batches: Sequence[int] = (1, 8), prefill_len: int = 128, runs: int = 5, seed: int = 0,
          progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Prefill tokens/s (B=1, prefill_len tokens, last-position logits) and greedy decode tokens/s per batch
    size (prompt tokens, then new_tokens; the decode phase alone, timed from the prefill's token to the last),
    every mode warmed up first, then run in turn (A B C A B C ...), median of `runs`; timed through
    gptjax.timing (as the bench harness times)."""
    rng = np.random.default_rng(seed)
    T = min(prefill_len, config.n_positions)
    prompt = min(prompt, config.n_positions - new_tokens)
    if prompt < 1:
        raise GptjaxError(f"new_tokens={new_tokens} leaves no room for a prompt in n_positions={config.n_positions}")
    # fresh inputs every round, the same for every mode; round 0 is the warm-up (compilation), not recorded
    rounds = [(rng.integers(0, config.vocab_size, (1, T)),
               {b: rng.integers(0, config.vocab_size, (b, prompt)).tolist() for b in batches}) for _ in range(runs + 1)]

    def job(mode: Mode, backend: Any, weights: Any) -> Callable[[int], tuple[float, dict[int, float]]]:
        def call(i: int) -> tuple[float, dict[int, float]]:
            n = max(i + 1, 0)  # the harness's warm-up call is i = -1
            tokens, prompts = rounds[n]
            if progress:  # the warm-up round compiles and is not counted: runs timed rounds follow it
                progress(f"{'warm-up' if n == 0 else f'round {n}/{runs}'} {mode.label}")
            prefill = T / timed(lambda: backend.forward(weights, tokens, last_only=True))
            return prefill, {b: _decode_rate(backend, weights, prompts[b], new_tokens) for b in batches}

        return call

    fns = {str(k): job(mode, backend, weights) for k, (mode, backend, weights, _) in enumerate(built)}
    measured = interleaved_runs(fns, runs, warmup=1).values()
    return [{"prefill": median([p for p, _ in m]), "decode": {b: median([d[b] for _, d in m]) for b in batches}}
            for m in measured]


def _decode_rate(backend: Any, weights: Any, prompts: list[list[int]], new_tokens: int) -> float:
    """Tokens/s of a greedy stream's decode phase: the tokens after the prefill's, over the time from the
    prefill's chunk to the last chunk."""
    chunks = stamps(backend.stream(weights, prompts, new_tokens, chunk_size=new_tokens, sampling=GREEDY))
    n = sum(len(t) for _, chunk in chunks[1:] for t in chunk.tokens)
    return n / (chunks[-1][0] - chunks[0][0])


def report(config: GPTConfig, params: Params, windows: np.ndarray | None, modes: Sequence[Mode] = DEFAULT_MODES, *,
           backend: str = "jax", timing: dict[str, Any] | None = None,
           progress: Callable[[str], None] | None = None) -> list[ModeReport]:
    """Every mode's bytes, quality on windows (skipped if None) and speed (skipped if timing is None; else
    keyword arguments of `speed`). The first mode must be fp32 (the reference)."""
    if not modes or modes[0].precision != "fp32":
        raise GptjaxError("the first mode of a precision report must be fp32 (the reference)")
    built = build(config, params, modes, backend)
    rows = [ModeReport(m.label, nbytes, config.kv_cache_bytes_per_token(b.kv_cache)) for m, b, _, nbytes in built]
    if windows is not None:
        for row, q in zip(rows, quality(built, windows)):
            for k, v in q.items():
                setattr(row, k, v)
    if timing is not None:
        for row, s in zip(rows, speed(built, config, progress=progress, **timing)):
            row.prefill_tokens_per_s, row.decode_tokens_per_s = s["prefill"], s["decode"]
    return rows


def table(rows: Sequence[ModeReport]) -> str:
    """A markdown table of a report (ratios against the first row)."""
    base = rows[0]
    batches = sorted({b for r in rows for b in r.decode_tokens_per_s})
    head = ["mode", "weights MB", "x fp32", "KV B/token", "loss", "ppl", "Δppl", "top-1 =", "greedy =",
            "prefill max |Δlogit|", "prefill mean |Δlogit|", "prefill tok/s"] + [f"decode B={b} tok/s (x fp32)" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.mode, f"{r.weight_bytes / 1e6:.2f}", f"{r.weight_bytes / base.weight_bytes:.3f}",
                 f"{r.kv_bytes_per_token:,}", f"{r.loss:.4f}", f"{r.perplexity:.3f}",
                 f"{100 * r.perplexity_change:+.2f}%",
                 f"{100 * r.top1_agreement:.2f}%", f"{100 * r.greedy_agreement:.1f}%", f"{r.max_logit_error:.4f}",
                 f"{r.mean_logit_error:.5f}",
                 f"{r.prefill_tokens_per_s:,.0f}"]
        cells += [f"{r.decode_tokens_per_s[b]:,.1f} ({r.decode_tokens_per_s[b] / base.decode_tokens_per_s[b]:.2f}x)"
                  if b in r.decode_tokens_per_s else "–" for b in batches]
        lines.append("| " + " | ".join(c.replace("nan", "–") for c in cells) + " |")
    return "\n".join(lines)
