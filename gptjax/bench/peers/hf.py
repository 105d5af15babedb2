"""The Hugging Face peer: GPT-2 on PyTorch doing the same work on the same weights (gptjax's checkpoint of
them), with as many CPU threads as XLA uses, on CUDA when this torch build sees a GPU (else the CPU).
Precisions: fp32, bf16 (the model cast to bfloat16; training under bf16 autocast), int8/w8a8 (torch dynamic
quantisation, W8A8, after HF's Conv1D layers become Linear; CPU only). torch and transformers (the peer extra) are
imported in the functions that use them: gptjax runs without them, and `gptjax bench --help` imports this module."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from gptjax import precision as registry
from gptjax.bench.env import torch_threads
from gptjax.bench.workloads import N_INPUTS, Shape, token_batches
from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.timing import clock
from gptjax.weights import save_checkpoint

PEER_NOTES = {"fp32": "HF GPT2LMHeadModel, float32", "bf16": "HF GPT2LMHeadModel cast to bfloat16",
              "int8": "HF + torch quantize_dynamic (W8A8 dynamic, not weight-only)",
              "w8a8": "HF + torch quantize_dynamic (W8A8 dynamic)"}


def require_peer() -> None:
    """Raise a GptjaxError naming the extra to install when torch or transformers is missing."""
    try:  # the peer extra is optional: is it installed?
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise GptjaxError(f"--peer hf needs the `peer` extra (pip install 'gptjax[peer]'): {e}") from None


def hf_model(params: dict, config: GPTConfig, precision: str = "fp32") -> Any:
    """transformers' GPT2LMHeadModel loaded from gptjax's own checkpoint of these params (eval mode), in the
    peer's counterpart of this precision."""
    from transformers import GPT2LMHeadModel  # the peer extra (optional)
    from transformers.utils import logging as hf_logging  # the peer extra (optional)

    hf_logging.disable_progress_bar()
    if precision not in PEER_NOTES:
        raise GptjaxError(f"the peer has no counterpart of precision {precision!r}")
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(config, params, d + "/ck")
        model = GPT2LMHeadModel.from_pretrained(d + "/ck").eval()
    if registry.storage(precision) == "int8":
        return _quantized(model)
    import torch  # the peer extra (optional)

    return model.to(device=peer_device(), dtype=torch.bfloat16 if precision == "bf16" else torch.float32)


def about() -> dict[str, Any]:
    """torch's and transformers' versions and where the peer runs."""
    import torch  # the peer extra (optional)
    import transformers  # the peer extra (optional)

    return {"version": f"transformers {transformers.__version__}, torch {torch.__version__}",
            "build": {"device": peer_device(), "int8": "torch quantize_dynamic (CPU)"}}


def logits(params: dict, config: GPTConfig, precision: str, tokens: np.ndarray) -> np.ndarray:
    """The peer's float32 logits [T, V] for one sequence of tokens [T] (its correctness check)."""
    import torch  # the peer extra (optional)

    model = hf_model(params, config, precision)
    with torch.inference_mode():
        return model(_on(model, torch.from_numpy(tokens.astype(np.int64))[None])).logits[0].float().cpu().numpy()


def peer_device() -> str:
    """"cuda" when this torch build sees a GPU, else "cpu"."""
    import torch  # the peer extra (optional)

    return "cuda" if torch.cuda.is_available() else "cpu"


def _on(model: Any, tensor: Any) -> Any:
    """tensor on the model's device."""
    return tensor.to(next(model.parameters()).device)


def describe(precision: str) -> str:
    """What the peer runs for this precision, and where."""
    where = "cpu" if registry.storage(precision) == "int8" else peer_device()
    return f"{PEER_NOTES[precision]}, torch on {where}"


def _sync() -> None:
    import torch  # the peer extra (optional)

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _quantized(model: Any) -> Any:
    """torch dynamic int8 quantisation of every Linear (HF GPT-2's Conv1D layers converted to Linear first)."""
    import torch  # the peer extra (optional)
    from transformers.pytorch_utils import Conv1D  # the peer extra (optional)

    def to_linear(module: Any) -> None:
        for name, child in module.named_children():
            if isinstance(child, Conv1D):
                linear = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1])
                linear.weight.data, linear.bias.data = child.weight.data.t().contiguous(), child.bias.data
                setattr(module, name, linear)
            else:
                to_linear(child)

    to_linear(model)
    return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def peer_job(params: dict, config: GPTConfig, shape: Shape, precision: str, threads: int | None = None
             ) -> tuple[Callable[[int], object], Callable[[], dict[str, Any]] | None]:
    """(call(i), latencies or None) doing this workload the HF way on input i % N_INPUTS, torch using `threads`
    CPU threads (default: as many as XLA)."""
    if shape.workload == "train":
        return _train(params, config, shape, precision, threads), None
    model = hf_model(params, config, precision)
    if shape.workload == "prefill":
        return _prefill(model, config, shape, threads), None
    return _decode(model, config, shape, threads)


def _prefill(model: Any, config: GPTConfig, shape: Shape, threads: int | None) -> Callable[[int], object]:
    import torch  # the peer extra (optional)

    batches = [_on(model, torch.from_numpy(b.astype(np.int64))) for b in token_batches(config, shape.batch, shape.seq)]

    def call(i: int) -> object:
        with torch.inference_mode(), torch_threads(threads):
            return model(batches[i % N_INPUTS], use_cache=False, logits_to_keep=1).logits.float().cpu().numpy()

    return call


def hf_generate(model: Any, prompt: Any, new: int, stopping: Any = None, threads: int | None = None) -> Any:
    """Exactly `new` greedy tokens after each row of prompt (a [B, P] int64 tensor): HF generate with the
    cache, all rows the same length; returns [B, P + new]."""
    import torch  # the peer extra (optional)

    with torch.inference_mode(), torch_threads(threads):
        out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True,
                             pad_token_id=0, attention_mask=torch.ones_like(prompt), stopping_criteria=stopping)
        return out.cpu()  # waits for the device


def _decode(model: Any, config: GPTConfig, shape: Shape, threads: int | None
            ) -> tuple[Callable[[int], object], Callable[[], dict]]:
    import torch  # the peer extra (optional)

    prompts = [_on(model, torch.from_numpy(b.astype(np.int64)))
               for b in token_batches(config, shape.batch, shape.prompt)]

    def latencies() -> dict[str, Any]:
        stamps = _Stamps()
        t0 = clock()
        hf_generate(model, prompts[1], shape.new, [stamps], threads)
        times = [t - t0 for t in stamps.times]
        return {"ttft_s": times[0], "per_token_s": np.diff(times).tolist()}

    return (lambda i: hf_generate(model, prompts[i % N_INPUTS], shape.new, threads=threads)), latencies


class _Stamps:
    """A transformers stopping criterion that never stops and records when each new token is ready."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch  # the peer extra (optional)

        _sync()
        self.times.append(clock())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _train(params: dict, config: GPTConfig, shape: Shape, precision: str, threads: int | None
           ) -> Callable[[int], object]:
    """One AdamW step (forward, backward, update) of HF GPT-2 in train mode (no dropout), bf16 by autocast."""
    import torch  # the peer extra (optional)

    if precision not in registry.training_modes():
        raise GptjaxError(f"the peer trains in {' or '.join(registry.training_modes())}, not {precision!r}")
    model = hf_model(params, config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    batches = [_on(model, torch.from_numpy(b.astype(np.int64))) for b in token_batches(config, shape.batch, shape.seq)]

    def step(i: int) -> None:
        x = batches[i % N_INPUTS]
        with torch_threads(threads), torch.autocast(peer_device(), dtype=torch.bfloat16, enabled=precision == "bf16"):
            model(x, labels=x).loss.backward()
        with torch_threads(threads):
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync()

    return step
