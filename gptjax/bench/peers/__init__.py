"""The peers: other engines doing gptjax's work on the same weights in the same run (`gptjax bench --peer LIST`).

hf (Hugging Face GPT-2 on PyTorch, module hf) runs in gptjax's process, as it always has. llama.cpp, ct2
(CTranslate2) and ort (ONNX Runtime) each run in a process of their own (module worker, driven through
process.PeerProcess), with as many threads as XLA:CPU uses, on model files each makes from gptjax's checkpoint of
the run's weights: llama.cpp from gptjax's GGUF export (then llama.cpp's own quantiser for its quantised types),
CTranslate2 from a model spec filled with the same arrays, ONNX Runtime from an ONNX graph of GPT-2 with a KV
cache built from them (then ORT's dynamic int8 quantiser).

VARIANTS is the mode mapping: a gptjax mode is measured against each peer's variants of the same storage width.
TOLERANCES gates the correctness check each variant passes before it is timed (logits on a fixed input against
gptjax fp32's, greedy-token agreement on the same input)."""

from __future__ import annotations

from gptjax import precision as registry
from gptjax.errors import GptjaxError

PROCESS_PEERS = {"llama.cpp": "gptjax.bench.peers.llama_cpp", "ct2": "gptjax.bench.peers.ct2",
                 "ort": "gptjax.bench.peers.ort"}
PEERS = (*PROCESS_PEERS, "hf")
# storage width in bits of a gptjax mode -> each peer's variants of that width
VARIANTS = {"llama.cpp": {32: ("f32",), 16: ("f16", "bf16"), 8: ("q8_0",), 4: ("q4_0", "q4_K_M")},
            "ct2": {32: ("float32",), 16: ("bfloat16",), 8: ("int8_float32",)},
            "ort": {32: ("fp32",), 8: ("int8",)},
            "hf": {32: ("fp32",), 16: ("bf16",), 8: ("int8",)}}
# variant -> (largest max|peer - gptjax fp32| / max|gptjax fp32| on the check input, least greedy agreement): as
# far from gptjax fp32 as gptjax's own mode of that width is, with a margin. Measured on random gpt2 weights (seed
# 0, 32 tokens): gptjax bf16 0.007 / 97%, int8 0.030 / 97%, w8a8 0.040 / 94%, int4 0.33 / 31%; llama.cpp f32
# 8e-4 / 100% (ggml's fp16 GELU table), q4_0 0.28 / 44%, q4_K_M 0.22 / 53%; ORT int8 0.049 / 78%; HF int8 0.069 / 91%
TOLERANCES = {"f32": (2e-3, 1.0), "float32": (1e-4, 1.0), "fp32": (1e-4, 1.0),
              "f16": (1e-2, 0.95), "bf16": (2e-2, 0.9), "bfloat16": (2e-2, 0.9),
              "q8_0": (0.1, 0.75), "int8_float32": (0.1, 0.75), "int8": (0.1, 0.75),
              "q4_0": (0.4, 0.3), "q4_K_M": (0.4, 0.3)}


def parse_peers(text: str | None) -> tuple[str, ...]:
    """"llama.cpp,ct2" -> ("llama.cpp", "ct2"); None, "" or "none" -> (); a GptjaxError for an unknown name."""
    names = tuple(dict.fromkeys(n.strip() for n in (text or "").split(",") if n.strip() and n.strip() != "none"))
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise GptjaxError(f"--peer {unknown[0]!r}; allowed: a comma list of {', '.join(PEERS)} (or none)")
    return names


def width(precision: str) -> int:
    """The storage width in bits of a gptjax mode's weights (fp32 32, bf16 16, int8/w8a8/fp8 8, int4 4)."""
    s = registry.STORAGES[registry.storage(precision)]
    return min(8 * s.value_bytes, s.bits) if s.scaled else 8 * s.value_bytes


def variants(peer: str, precision: str) -> tuple[str, ...]:
    """The peer's variants measured against this gptjax mode (none where the peer has no such width)."""
    return VARIANTS[peer].get(width(precision), ())
