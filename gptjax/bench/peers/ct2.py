"""The CTranslate2 peer (runs in its worker process): a Generator on a model spec filled with the checkpoint's own
arrays (what ct2-transformers-converter does, without loading transformers or torch), float32 on disk; the variant
is CTranslate2's compute_type (float32, bfloat16, int8_float32: int8 weights, float32 activations), converted at
load. Greedy decoding is generate_batch(sampling_topk=1) with min_length so an end token cannot stop it early;
prefill is generate_batch with one new token (the prompt's forward pass, the head on its last position only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gptjax.config import GPTConfig
from gptjax.weights import load_checkpoint


def about() -> dict[str, Any]:
    """CTranslate2's version, its device (CUDA where its build sees a GPU) and the compute types offered there."""
    import ctranslate2  # the peers extra

    device = "cuda" if ctranslate2.get_cuda_device_count() else "cpu"
    return {"version": ctranslate2.__version__,
            "build": {"device": device, "compute_types": sorted(ctranslate2.get_supported_compute_types(device))}}


def load(checkpoint: str, variant: str, threads: int, workdir: str) -> Engine:
    """The model converted once into WORKDIR/ct2-model, loaded with compute_type=variant on `threads` threads."""
    import ctranslate2  # the peers extra

    model_dir = Path(workdir) / "ct2-model"
    if not (model_dir / "model.bin").is_file():
        convert(checkpoint, model_dir)
    device = "cuda" if ctranslate2.get_cuda_device_count() else "cpu"  # a CUDA build on a GPU: --device-check
    generator = ctranslate2.Generator(str(model_dir), device=device, compute_type=variant, intra_threads=threads,
                                      inter_threads=1)
    return Engine(generator, generator_vocabulary(model_dir))


def generator_vocabulary(model_dir: Path) -> list[str]:
    """The token strings by id (CTranslate2 takes and returns strings)."""
    import json

    return json.loads((model_dir / "vocabulary.json").read_text(encoding="utf-8"))


def convert(checkpoint: str, out: Path) -> None:
    """Write a CTranslate2 model directory from a gptjax/HF GPT-2 checkpoint (float32)."""
    from ctranslate2.converters.converter import Converter  # the peers extra

    config, params = load_checkpoint(checkpoint)

    class FromParams(Converter):
        def _load(self) -> Any:
            return model_spec(config, params)

    FromParams().convert(str(out), force=True)


def model_spec(config: GPTConfig, params: dict[str, np.ndarray]) -> Any:
    """ctranslate2's decoder spec of GPT-2 (pre-norm, tanh GELU) holding params; Conv1D kernels [in, out] are
    written [out, in] as CTranslate2's Linear wants; the head is the tied table unless lm_head exists."""
    from ctranslate2.specs import common_spec, transformer_spec  # the peers extra

    spec = transformer_spec.TransformerDecoderModelSpec.from_config(
        config.n_layer, config.n_head, pre_norm=True, activation=common_spec.Activation.GELUTanh)
    d = spec.decoder
    d.scale_embeddings = False
    d.embeddings.weight, d.position_encodings.encodings = params["wte.weight"], params["wpe.weight"]
    _norm(d.layer_norm, params, "ln_f")
    for i, layer in enumerate(d.layer):
        h = f"h.{i}."
        _norm(layer.self_attention.layer_norm, params, h + "ln_1")
        _linear(layer.self_attention.linear[0], params, h + "attn.c_attn")
        _linear(layer.self_attention.linear[1], params, h + "attn.c_proj")
        _norm(layer.ffn.layer_norm, params, h + "ln_2")
        _linear(layer.ffn.linear_0, params, h + "mlp.c_fc")
        _linear(layer.ffn.linear_1, params, h + "mlp.c_proj")
    d.projection.weight = params.get("lm_head.weight", params["wte.weight"])
    d.projection.bias = np.zeros(config.vocab_size, np.float32)
    tokens = [f"<t{i}>" for i in range(config.vocab_size)]  # ids are what is measured: any unique strings
    spec.register_vocabulary(tokens)
    spec.config.bos_token = spec.config.eos_token = spec.config.unk_token = tokens[0]
    return spec


def _norm(spec: Any, params: dict[str, np.ndarray], key: str) -> None:
    spec.gamma, spec.beta = params[key + ".weight"], params[key + ".bias"]


def _linear(spec: Any, params: dict[str, np.ndarray], key: str) -> None:
    spec.weight = np.ascontiguousarray(params[key + ".weight"].T)  # [in, out] -> [out, in]
    spec.bias = params[key + ".bias"]


class Engine:
    """A CTranslate2 Generator behind the worker's engine interface (ids in, ids out)."""

    def __init__(self, generator: Any, vocabulary: list[str]) -> None:
        self.generator, self.tokens = generator, vocabulary
        self.ids = {t: i for i, t in enumerate(vocabulary)}

    def _strings(self, rows: np.ndarray) -> list[list[str]]:
        return [[self.tokens[t] for t in row] for row in np.atleast_2d(rows).tolist()]

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """[T] -> [T, V]: forward_batch's logits of every position."""
        return np.asarray(self.generator.forward_batch(self._strings(tokens)))[0]

    def prefill(self, tokens: np.ndarray) -> None:
        """[B, T]: the prompt's forward pass and one greedy token."""
        self.generate(tokens, 1)

    def generate(self, prompts: np.ndarray, new: int) -> np.ndarray:
        """[B, P] -> [B, new] greedy tokens."""
        results = self.generator.generate_batch(
            self._strings(prompts), max_length=new, min_length=new, sampling_topk=1, beam_size=1,
            include_prompt_in_result=False, max_batch_size=len(prompts))
        return np.array([r.sequences_ids[0] for r in results])
