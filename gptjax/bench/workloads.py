"""The gptjax side of each workload: a call that runs it once (blocking until the result is ready) on rotating
inputs, plus its work in FLOPs and bytes, its memory, and extra latency samples where a workload has them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gptjax import precision as registry
from gptjax.backends import get_backend
from gptjax.bench import metrics
from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.sampling import GREEDY
from gptjax.timing import stamps

N_INPUTS = 4  # distinct input batches, rotated run by run so no cache (ours, XLA's, the CPU's) sees a repeat


@dataclass(frozen=True)
class Shape:
    """One workload's shape: batch, and seq (prefill, train) or prompt + new tokens (decode)."""

    workload: str  # prefill | decode | train
    batch: int
    seq: int | None = None
    prompt: int | None = None
    new: int | None = None

    @property
    def label(self) -> str:
        """"B8 P32+32" for decode, "B1 T128" otherwise."""
        return f"B{self.batch} P{self.prompt}+{self.new}" if self.workload == "decode" else f"B{self.batch} T{self.seq}"

    @property
    def tokens(self) -> int:
        """Tokens one call processes (prefill, train) or produces (decode)."""
        return self.batch * (self.new if self.workload == "decode" else self.seq)


@dataclass
class Job:
    """A workload ready to time: call(i) runs it on input i % N_INPUTS; latencies() gives extra samples."""

    call: Callable[[int], object]
    flops: int
    bytes_moved: float
    memory: dict[str, Any]
    latencies: Callable[[], dict[str, Any]] | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    prompt: Callable[[int], object] | None = None  # decode: the same prompts with one new token (the prefill)


def backend_options(precision: str, kv_cache: str | None) -> dict[str, str]:
    """get_backend options for a precision variant (fp32 is the default and passes nothing)."""
    options = {} if precision == "fp32" else {"precision": precision}
    return options | ({"kv_cache": kv_cache} if kv_cache else {})


def kv_precision(precision: str, kv_cache: str | None) -> str:
    """The KV cache's storage precision assumed for byte counts: the option, else bf16 for bf16, else fp32."""
    return kv_cache or registry.default_kv_cache(precision)


def token_batches(config: GPTConfig, batch: int, length: int, seed: int = 0) -> list[np.ndarray]:
    """N_INPUTS different random [batch, length] token arrays."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, config.vocab_size, (batch, length)).astype(np.int32) for _ in range(N_INPUTS)]


def ours(backend_name: str, config: GPTConfig, params: dict, shape: Shape, precision: str,
         kv_cache: str | None) -> Job:
    """gptjax's job for this shape and precision; GptjaxError when the backend refuses the variant."""
    if shape.workload == "train":
        return _train(backend_name, config, params, shape, precision)
    backend = get_backend(backend_name, config, **backend_options(precision, kv_cache))
    weights = backend.prepare(params)
    if shape.workload == "prefill":
        return _prefill(backend, weights, config, shape, precision)
    return _decode(backend, weights, config, shape, precision, kv_cache)


def _prefill(backend: Any, weights: Any, config: GPTConfig, shape: Shape, precision: str) -> Job:
    batches = token_batches(config, shape.batch, shape.seq)
    return Job(call=lambda i: backend.forward(weights, batches[i % N_INPUTS], last_only=True),
               flops=metrics.prefill_flops(config, shape.batch, shape.seq),
               bytes_moved=config.weight_bytes(precision),
               memory={"params_bytes": config.weight_bytes(precision)},
               notes={"flops_formula": f"forward_flops(B={shape.batch}, T={shape.seq}, last_only=True)",
                      "bytes_formula": f"weight_bytes({precision})"})


def _decode(backend: Any, weights: Any, config: GPTConfig, shape: Shape, precision: str,
            kv_cache: str | None) -> Job:
    B, P, n = shape.batch, shape.prompt, shape.new
    prompts = [p.tolist() for p in token_batches(config, B, P)]
    kv = kv_precision(precision, kv_cache)
    context = P + n / 2  # the mean context a decode step reads
    notes = {"kv_cache_counted": kv,
             "flops_formula": f"forward_flops(B={B}, T={P}, last_only=True) + {B}·(forward_flops(1, {P + n - 1}) "
                              f"- forward_flops(1, {P}))",
             "bytes_formula": f"{n}·(weight_bytes({precision}) + {B}·kv_cache_bytes_per_token({kv})·{context:g})"}
    return Job(call=lambda i: backend.generate(weights, prompts[i % N_INPUTS], n, sampling=GREEDY),
               flops=metrics.decode_flops(config, B, P, n),
               bytes_moved=n * metrics.decode_step_bytes(config, precision, kv, B, context),
               memory={"params_bytes": config.weight_bytes(precision),
                       "cache_bytes": B * (P + n) * config.kv_cache_bytes_per_token(kv)},
               latencies=lambda: stream_latencies(backend, weights, prompts[1], n), notes=notes,
               prompt=lambda i: backend.generate(weights, prompts[i % N_INPUTS], 1, sampling=GREEDY))


def stream_latencies(backend: Any, weights: Any, prompts: list[list[int]], new: int) -> dict[str, Any]:
    """TTFT and the per-token gaps of a stream yielding after every decode step (each synced to the host)."""
    times = [t for t, _ in stamps(backend.stream(weights, prompts, new, chunk_size=1, sampling=GREEDY))]
    return {"ttft_s": times[0], "per_token_s": np.diff(times).tolist()}


def _train(backend_name: str, config: GPTConfig, params: dict, shape: Shape, precision: str) -> Job:
    if backend_name != "jax":
        raise GptjaxError(f"the train step runs on the jax backend only, not {backend_name!r}")
    if precision not in registry.training_modes():
        raise GptjaxError(f"training runs in {' or '.join(registry.training_modes())} compute, not {precision!r}")
    # jax, flax and optax (seconds) not at the top: `gptjax bench --help` imports this module
    from gptjax.train import TrainConfig, create_state, train_step

    tc = TrainConfig(batch_size=shape.batch, seq_len=shape.seq, compute_dtype=precision, warmup_steps=0)
    graphdef, state = create_state(config, tc, params)
    batches = token_batches(config, shape.batch, shape.seq + 1)
    holder = {"state": state}

    def step(i: int) -> None:
        b = batches[i % N_INPUTS]
        holder["state"], m = train_step(graphdef, tc, holder["state"], b[None, :, :-1], b[None, :, 1:])
        m.loss.block_until_ready()

    n = config.num_params()
    return Job(call=step, flops=metrics.train_flops(config, shape.batch, shape.seq),
               bytes_moved=metrics.train_step_bytes(config),
               memory={"params_bytes": 4 * n, "optimizer_bytes": 8 * n, "gradient_bytes": 4 * n},
               notes={"flops_formula": f"3·forward_flops(B={shape.batch}, T={shape.seq})",
                      "bytes_formula": "4·num_params·(2 + 7)"})
