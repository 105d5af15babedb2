"""A GPT-2 checkpoint (gptjax's or Hugging Face's) as a GGUF file that llama.cpp loads and runs.

llama.cpp's GPT-2 graph (src/models/gpt2.cpp) wants `token_embd`, `position_embd`, per block `attn_norm`,
`attn_qkv`, `attn_output`, `ffn_norm`, `ffn_up`, `ffn_down` (each with its bias) and `output_norm`; the head
falls back to `token_embd` when `output` is absent (tied). gguf writes a NumPy shape reversed as ggml's `ne`, so
each HF Conv1D kernel ([in, out]) is written transposed, out-major [out, in]. 1-D tensors (biases, norms) and
the position table stay float32; the matrices (and the tied table) take the chosen type, quantised by the
`gguf` package's NumPy quantisers (q8_0 "bit-exact with the reference", q4_0 per 32 values).

The vocabulary: the checkpoint's own GPT-2 BPE (tokenizer.json, or vocab.json + merges.txt), else GPT-2's
byte-to-character map in byte order, so that llama.cpp tokenises text to exactly the byte ids gptjax's byte
tokenizer gives; rows beyond 256 (random gpt2-shape weights) get unique placeholder strings. llama.cpp refuses a
file without merges, and gguf refuses an empty array, so a byte vocabulary carries one merge that can never apply
("ĠĠ ĠĠ": text splits into single byte characters, and no merge ever makes "ĠĠ"; a merge of two byte characters,
"Ġ Ġ", made llama.cpp drop a space of every run of three).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.quantize import precision_of
from gptjax.tokenizer import CharTokenizer, has_tokenizer, load_tokenizer
from gptjax.weights import load_checkpoint

BLOCK = 32  # values per q8_0 / q4_0 block: a quantised row's length must be a multiple of it
# --type -> (ggml type name of the matrices, llama file type name); the gguf package is imported on use
GGUF_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
              "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0")}
# canonical block key suffix -> (GGUF name, transpose?): Conv1D kernels [in, out] become out-major [out, in]
_BLOCK_TENSORS = {"ln_1.weight": ("attn_norm.weight", False), "ln_1.bias": ("attn_norm.bias", False),
                  "attn.c_attn.weight": ("attn_qkv.weight", True), "attn.c_attn.bias": ("attn_qkv.bias", False),
                  "attn.c_proj.weight": ("attn_output.weight", True), "attn.c_proj.bias": ("attn_output.bias", False),
                  "ln_2.weight": ("ffn_norm.weight", False), "ln_2.bias": ("ffn_norm.bias", False),
                  "mlp.c_fc.weight": ("ffn_up.weight", True), "mlp.c_fc.bias": ("ffn_up.bias", False),
                  "mlp.c_proj.weight": ("ffn_down.weight", True), "mlp.c_proj.bias": ("ffn_down.bias", False)}
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3  # llama.cpp's token types
NO_MERGE = "ĠĠ ĠĠ"  # a merge no byte-level text can reach (llama.cpp needs one; see the module docstring)


def export_gguf(checkpoint: str | os.PathLike, out: str | os.PathLike, gguf_type: str = "f32") -> Path:
    """Write `checkpoint` (a float GPT-2 checkpoint directory) as the GGUF file `out` (which must not exist), its
    matrices in `gguf_type`; written to a temporary file beside `out` and renamed, so `out` is whole or absent."""
    if gguf_type not in GGUF_TYPES:
        raise GptjaxError(f"--type {gguf_type!r}; allowed: {', '.join(GGUF_TYPES)}")
    out = Path(out)
    if out.exists():
        raise GptjaxError(f"--out {str(out)!r} exists; give a new file name (nothing is overwritten)")
    config, params = load_checkpoint(checkpoint)
    stored = precision_of(params)
    if stored not in ("fp32", "bf16"):
        raise GptjaxError(f"{checkpoint} is stored as {stored}; export from a float (fp32 or bf16) checkpoint: "
                          "GGUF's quantised types are made from float weights")
    return write_gguf(config, params, vocabulary(checkpoint, config.vocab_size), out, gguf_type)


def write_gguf(config: GPTConfig, params: dict[str, np.ndarray], vocab: dict[str, Any], out: str | os.PathLike,
               gguf_type: str = "f32") -> Path:
    """Write canonical params (float) with a vocabulary (see vocabulary()) as the GGUF file `out`, atomically."""
    import gguf  # the peers extra: imported here so that gptjax runs without it

    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        writer = gguf.GGUFWriter(str(tmp), "gpt2")
        _metadata(writer, config, gguf_type)
        _tokenizer(writer, vocab)
        for name, array in gguf_tensors(config, params):
            _add(writer, name, array, gguf_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def gguf_tensors(config: GPTConfig, params: dict[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF tensor name, float32 array in ggml's layout) for every weight; the head is the tied token table
    unless the checkpoint has its own lm_head."""
    def f32(key: str) -> np.ndarray:
        return np.asarray(params[key], np.float32)

    yield "token_embd.weight", f32("wte.weight")  # [V, D]
    yield "position_embd.weight", f32("wpe.weight")  # [P, D]
    for i in range(config.n_layer):
        for suffix, (name, transpose) in _BLOCK_TENSORS.items():
            a = f32(f"h.{i}.{suffix}")
            yield f"blk.{i}.{name}", np.ascontiguousarray(a.T) if transpose else a  # [in, out] -> [out, in]
    yield "output_norm.weight", f32("ln_f.weight")
    yield "output_norm.bias", f32("ln_f.bias")
    if not config.tie_word_embeddings:
        yield "output.weight", f32("lm_head.weight")  # [V, D]


def _metadata(writer: Any, config: GPTConfig, gguf_type: str) -> None:
    import gguf  # the peers extra

    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.mlp_width)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)  # required: llama.cpp reads it for GPT-2
    writer.add_file_type(int(getattr(gguf.LlamaFileType, GGUF_TYPES[gguf_type][1])))
    if gguf_type.startswith("q"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add(writer: Any, name: str, array: np.ndarray, gguf_type: str) -> None:
    """One tensor: 1-D tensors and the position table float32, the matrices in the chosen type."""
    import gguf  # the peers extra

    kind = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[gguf_type][0])
    if array.ndim == 1 or name == "position_embd.weight" or kind == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, array)
    elif kind == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, array.astype(np.float16))
    else:
        if kind != gguf.GGMLQuantizationType.BF16 and array.shape[-1] % BLOCK:
            raise GptjaxError(f"{name} rows have {array.shape[-1]} values; --type {gguf_type} quantises blocks of "
                              f"{BLOCK}: use f32, f16 or bf16 for this model")
        writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)


def _tokenizer(writer: Any, vocab: dict[str, Any]) -> None:
    writer.add_tokenizer_model("gpt2")  # byte-level BPE
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(vocab["bos"])
    writer.add_eos_token_id(vocab["eos"])
    writer.add_add_bos_token(False)


# ---- the vocabulary ---------------------------------------------------------------------------------
def byte_characters() -> list[str]:
    """GPT-2's printable character for each byte 0..255 (its byte-level BPE's alphabet), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:  # control and blank bytes map past 255, in order
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in range(256)]


def vocabulary(checkpoint: str | os.PathLike, vocab_size: int) -> dict[str, Any]:
    """tokens (exactly vocab_size unique strings), their types, merges and BOS/EOS ids for a checkpoint: its own
    GPT-2 BPE files if it has them, else the byte alphabet (placeholders past 256 rows)."""
    if has_tokenizer(checkpoint):
        if isinstance(load_tokenizer(checkpoint), CharTokenizer):  # escapes + nibbles: no GGUF tokenizer model
            raise GptjaxError(f"{checkpoint}: a char:N tokenizer cannot be exported to GGUF (llama.cpp has no "
                              "tokenizer model for it); export supports the byte and GPT-2 BPE tokenizers")
        return bpe_vocabulary(Path(checkpoint), vocab_size)
    return byte_vocabulary(vocab_size)


def byte_vocabulary(vocab_size: int) -> dict[str, Any]:
    """The byte alphabet (the first vocab_size of it), then unique placeholders "<t256>", ...; a merge that never
    applies."""
    tokens = byte_characters()[:vocab_size] + [f"<t{i}>" for i in range(256, vocab_size)]
    return {"tokens": tokens, "types": [TOKEN_NORMAL] * vocab_size, "merges": [NO_MERGE], "bos": 0, "eos": 0}


def bpe_vocabulary(directory: Path, vocab_size: int) -> dict[str, Any]:
    """The checkpoint's GPT-2 BPE: its tokens by id (added and <|endoftext|> as control tokens), its merges; rows
    past the tokenizer's vocabulary (a padded embedding) get placeholders."""
    vocab, merges, added = _bpe_files(directory)
    by_id = {i: t for t, i in (vocab | added).items()}
    if max(by_id) >= vocab_size:
        raise GptjaxError(f"{directory}: the tokenizer has token id {max(by_id)}, the model {vocab_size} rows")
    tokens = [by_id.get(i, f"<unused{i}>") for i in range(vocab_size)]
    control = set(added) | {"<|endoftext|>"}
    eos = next((i for i, t in enumerate(tokens) if t == "<|endoftext|>"), 0)
    return {"tokens": tokens, "types": [TOKEN_CONTROL if t in control else TOKEN_NORMAL for t in tokens],
            "merges": merges or [NO_MERGE], "bos": eos, "eos": eos}


def _bpe_files(directory: Path) -> tuple[dict[str, int], list[str], dict[str, int]]:
    """(token -> id, merges as "a b", added token -> id) from tokenizer.json, else vocab.json + merges.txt."""
    if (directory / "tokenizer.json").is_file():
        spec = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]  # both file formats
        return spec["model"]["vocab"], merges, {a["content"]: a["id"] for a in spec.get("added_tokens", [])}
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
    return vocab, [m for m in lines if m.strip() and not m.startswith("#version")], {}
