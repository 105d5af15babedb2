"""`gptjax export --format gguf`: the file's layout and vocabulary, llama.cpp running it (logits against gptjax's
per type, greedy tokens, its tokenizer giving gptjax's ids), and bad input as one clear line. Needs the peers
extra (gguf, llama-cpp-python): skipped without it, except under CI, which installs it (a missing one fails)."""

from __future__ import annotations

import importlib
import json
import os

import numpy as np
import pytest

from gptjax import GPTConfig, get_backend, init_params, save_checkpoint
from gptjax.cli import main
from gptjax.sampling import GREEDY


def need(module: str):
    """The module, or a skip where the peers extra is not installed (a failure under CI, which installs it)."""
    return importlib.import_module(module) if os.environ.get("CI") else pytest.importorskip(module)


gguf = need("gguf")
CONFIG = GPTConfig(vocab_size=256, n_positions=64, n_layer=2, n_head=2, n_embd=64)  # gptjax's byte vocabulary
# per --type: (largest |llama.cpp - gptjax| / largest |gptjax| logit over 24 positions, least greedy agreement);
# measured here (llama-cpp-python 0.3.36): f32 9.7e-4 (ggml's fp16 GELU table), f16 1.0e-3, bf16 7.2e-3, q8_0
# 2.2e-2, all 100% greedy; q4_0 0.24 and 58% (4-bit blocks of 32 on a 64-wide model with large random weights)
TOLERANCE = {"f32": (2e-3, 1.0), "f16": (3e-3, 1.0), "bf16": (2e-2, 0.95), "q8_0": (5e-2, 0.9), "q4_0": (0.35, 0.5)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 2-layer byte-vocabulary model with weights far enough from init that its logits are decisive."""
    rng = np.random.default_rng(0)
    params = {k: v + rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in init_params(CONFIG).items()}
    path = tmp_path_factory.mktemp("export") / "ck"
    save_checkpoint(CONFIG, params, path)
    return path, params


def export(checkpoint, out, gguf_type="f32") -> int:
    return main(["export", "--format", "gguf", "--checkpoint", str(checkpoint), "--out", str(out), "--type", gguf_type])


def test_the_file_has_llama_cpp_gpt2_layout_and_the_byte_vocabulary(checkpoint, tmp_path):
    from gptjax.export.gguf import byte_characters

    assert export(checkpoint[0], tmp_path / "m.gguf", "q8_0") == 0
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # written atomically: no temporary file left
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 12 * CONFIG.n_layer + 2 and "output.weight" not in tensors  # the head is tied
    qkv = tensors["blk.0.attn_qkv.weight"]
    assert qkv.tensor_type.name == "Q8_0" and list(qkv.shape) == [64, 192]  # ggml ne: [in, out]
    assert tensors["blk.1.ffn_norm.bias"].tensor_type.name == "F32"
    assert tensors["position_embd.weight"].tensor_type.name == "F32"
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode() for i in field.data]
    assert tokens == byte_characters() and tokens[10] == "Ċ" and tokens[32] == "Ġ"


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", list(TOLERANCE))
def test_llama_cpp_runs_the_export_within_each_types_tolerance(checkpoint, tmp_path, gguf_type):
    need("llama_cpp")
    from gptjax.bench.peers.llama_cpp import open_model

    path, params = checkpoint
    assert export(path, tmp_path / "m.gguf", gguf_type) == 0
    engine = open_model(tmp_path / "m.gguf", threads=2)
    tokens = np.random.default_rng(1).integers(0, 256, 24).astype(np.int32)
    ours = get_backend("numpy", CONFIG).forward(params, tokens[None])[0]
    theirs = engine.logits(tokens)
    rel = np.abs(theirs - ours).max() / np.abs(ours).max()
    agree = (theirs.argmax(-1) == ours.argmax(-1)).mean()
    max_rel, min_agree = TOLERANCE[gguf_type]
    assert rel <= max_rel and agree >= min_agree, (rel, agree)
    if gguf_type == "f32":  # greedy decoding: the same 12 tokens after each of two prompts, batched
        prompts = [tokens[:8].tolist(), tokens[8:16].tolist()]
        expected = get_backend("numpy", CONFIG).generate(params, prompts, 12, sampling=GREEDY).tokens
        assert engine.generate(np.array(prompts), 12).tolist() == [list(t) for t in expected]


@pytest.mark.slow
def test_llama_cpp_tokenises_text_to_gptjax_ids(checkpoint, tmp_path):
    """Byte vocabulary: llama.cpp's tokens are the UTF-8 bytes; a BPE checkpoint: the same ids as gptjax's BPE."""
    need("llama_cpp")
    from gptjax.bench.peers.llama_cpp import open_model
    from gptjax.export.gguf import byte_characters
    from gptjax.tokenizer import load_tokenizer

    path, params = checkpoint
    text = "def main():\n    return 'héllo'"
    assert export(path, tmp_path / "byte.gguf") == 0
    assert open_model(tmp_path / "byte.gguf", 1).tokenize(text) == list(text.encode())
    chars = byte_characters()
    vocab = {c: i for i, c in enumerate(chars[:254])} | {"de": 254, "<|endoftext|>": 255}  # a BPE of 256 tokens
    bpe = tmp_path / "bpe"
    save_checkpoint(CONFIG, params, bpe)
    (bpe / "vocab.json").write_text(json.dumps(vocab))
    (bpe / "merges.txt").write_text("#version: 0.2\nd e\n")
    assert export(bpe, tmp_path / "bpe.gguf") == 0
    text = "def dee"  # bytes 254/255 are not in this vocabulary
    assert open_model(tmp_path / "bpe.gguf", 1).tokenize(text) == load_tokenizer(bpe).encode(text)


@pytest.mark.parametrize("change, message", [
    ({"type": "q5_1"}, "--type 'q5_1'; allowed: f32, f16, bf16, q8_0, q4_0"),
    ({"format": "onnx"}, "--format 'onnx'; allowed: gguf"),
    ({"exists": True}, "exists; give a new file name (nothing is overwritten)"),
    ({"llama": True}, "model_type='llama'; only 'gpt2' is supported"),
    ({"quantised": True}, "is stored as int8; export from a float (fp32 or bf16) checkpoint"),
    ({"char": True}, "a char:N tokenizer cannot be exported to GGUF"),
])
def test_bad_input_is_one_clear_line(checkpoint, tmp_path, capsys, change, message):
    from gptjax.quantize import convert

    source, out = checkpoint[0], tmp_path / "m.gguf"
    if change.get("exists"):
        out.write_bytes(b"keep me")
    if change.get("llama"):
        source = tmp_path / "llama"
        save_checkpoint(CONFIG, checkpoint[1], source)
        spec = json.loads((source / "config.json").read_text()) | {"model_type": "llama"}
        (source / "config.json").write_text(json.dumps(spec))
    if change.get("char"):
        from gptjax.tokenizer import CharTokenizer

        source = tmp_path / "char"
        save_checkpoint(CONFIG, checkpoint[1], source)
        (source / "tokenizer.json").write_text(CharTokenizer("abc", 64).to_json())
    if change.get("quantised"):
        source = tmp_path / "int8"
        save_checkpoint(CONFIG, convert(checkpoint[1], CONFIG, "int8"), source)
    argv = ["export", "--format", change.get("format", "gguf"), "--checkpoint", str(source), "--out", str(out),
            "--type", change.get("type", "f32")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() or out.read_bytes() == b"keep me"
