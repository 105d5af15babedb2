"""The llama.cpp peer (runs in its worker process), through llama-cpp-python's low-level API (the high-level Llama
class drives one sequence; B=8 decode needs eight). Model files: gptjax's GGUF export (gptjax.export.gguf) in
f32, f16 and bf16; q8_0, q4_0 and q4_K_M by llama.cpp's own quantiser (llama_model_quantize, in libllama) from the
f32 export, so they are llama.cpp's mixes (q4_0 and q4_K_M keep the tied table at Q6_K) as a llama.cpp user gets.

Each call clears the KV cache, decodes the prompts as one batch (logits only at each row's last token), then one
batch of B tokens per step (greedy: NumPy argmax over llama_get_logits_ith, as gptjax's argmax on the host side)."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np

QUANTISED = {"q8_0": 7, "q4_0": 2, "q4_K_M": 15}  # llama_ftype of llama.cpp's quantiser
CELLS = 256  # a context's cells per sequence are a multiple of this


def _lib() -> Any:
    import llama_cpp  # the peers extra

    return llama_cpp


def about() -> dict[str, Any]:
    """llama-cpp-python's version and llama.cpp's system info (SIMD, OpenMP, llamafile, repack)."""
    L = _lib()
    L.llama_backend_init()
    return {"version": L.__version__, "build": {"system_info": L.llama_print_system_info().decode().strip(),
                                                "flash_attn_type": L.llama_context_default_params().flash_attn_type}}


def model_file(checkpoint: str, variant: str, threads: int, workdir: Path) -> Path:
    """WORKDIR/llama-VARIANT.gguf, made if missing: gptjax's export, or llama.cpp's quantiser over the f32 export."""
    from gptjax.export.gguf import export_gguf

    out = workdir / f"llama-{variant}.gguf"
    if out.is_file():
        return out
    if variant not in QUANTISED:
        return export_gguf(checkpoint, out, variant)
    L, f32 = _lib(), model_file(checkpoint, "f32", threads, workdir)
    params = L.llama_model_quantize_default_params()
    params.ftype, params.nthread = QUANTISED[variant], threads
    tmp = out.with_name(out.name + ".tmp")
    if L.llama_model_quantize(str(f32).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize to {variant} failed")
    return tmp.rename(out)


def load(checkpoint: str, variant: str, threads: int, workdir: str) -> Engine:
    """The variant's model loaded (on the CPU, memory-mapped as llama.cpp does by default)."""
    return open_model(model_file(checkpoint, variant, threads, Path(workdir)), threads)


def open_model(path: str | Path, threads: int) -> Engine:
    """Any GGUF file loaded by llama.cpp (on the CPU), behind the engine interface."""
    L = _lib()
    L.llama_backend_init()
    model = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    return Engine(model, threads)


class Engine:
    """One loaded model and a context per (sequences, cells) shape, behind the worker's engine interface."""

    def __init__(self, model: Any, threads: int) -> None:
        L = _lib()
        self.model, self.threads, self.contexts = model, threads, {}
        self.vocab_p = L.llama_model_get_vocab(model)
        self.vocab = L.llama_vocab_n_tokens(self.vocab_p)

    def _context(self, rows: int, length: int) -> tuple[Any, Any]:
        """(context, batch) for `rows` sequences of up to `length` tokens, made once per shape."""
        key = (rows, length)
        if key not in self.contexts:
            L = _lib()
            cp = L.llama_context_default_params()
            cp.n_ctx = rows * CELLS * -(-length // CELLS)
            cp.n_batch = cp.n_ubatch = max(512, rows * length)
            cp.n_seq_max, cp.n_threads, cp.n_threads_batch = rows, self.threads, self.threads
            ctx = L.llama_init_from_model(self.model, cp)
            if not ctx:
                raise RuntimeError(f"llama.cpp could not make a context for {rows} x {length} tokens")
            self.contexts[key] = (ctx, L.llama_batch_init(cp.n_batch, 0, rows))
        return self.contexts[key]

    def _decode(self, ctx: Any, batch: Any, rows: np.ndarray, start: int, all_logits: bool = False) -> None:
        """Decode tokens rows [B, T] at positions start.. of sequences 0..B-1 in one llama_decode; logits at each
        row's last token (every token with all_logits)."""
        B, T = rows.shape
        for n, (b, t) in enumerate(np.ndindex(B, T)):
            batch.token[n], batch.pos[n], batch.n_seq_id[n] = int(rows[b, t]), start + t, 1
            batch.seq_id[n][0], batch.logits[n] = b, all_logits or t == T - 1
        batch.n_tokens = B * T
        if _lib().llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def _greedy(self, ctx: Any, B: int, T: int) -> np.ndarray:
        """The argmax of each row's last logits after a decode of [B, T] tokens."""
        get = _lib().llama_get_logits_ith
        return np.array([np.ctypeslib.as_array(get(ctx, b * T + T - 1), (self.vocab,)).argmax() for b in range(B)])

    def _clear(self, ctx: Any) -> None:
        L = _lib()
        L.llama_memory_clear(L.llama_get_memory(ctx), True)

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokens for text (no BOS, special tokens as text)."""
        data = text.encode()
        ids = (_lib().llama_token * (len(data) + 8))()
        n = _lib().llama_tokenize(self.vocab_p, data, len(data), ids, len(ids), False, False)
        return list(ids[:n])

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """[T] -> [T, V]: one sequence, logits at every position."""
        ctx, batch = self._context(1, len(tokens))
        self._clear(ctx)
        self._decode(ctx, batch, tokens[None], 0, all_logits=True)
        return np.ctypeslib.as_array(_lib().llama_get_logits(ctx), (len(tokens), self.vocab)).copy()

    def prefill(self, tokens: np.ndarray) -> None:
        """[B, T]: the prompts' forward pass, logits at each row's last position."""
        ctx, batch = self._context(*tokens.shape)
        self._clear(ctx)
        self._decode(ctx, batch, tokens, 0)

    def generate(self, prompts: np.ndarray, new: int) -> np.ndarray:
        """[B, P] -> [B, new] greedy tokens."""
        B, P = prompts.shape
        ctx, batch = self._context(B, P + new)
        self._clear(ctx)
        self._decode(ctx, batch, prompts, 0)
        out = [self._greedy(ctx, B, P)]
        for step in range(new - 1):
            self._decode(ctx, batch, out[-1][:, None], P + step)
            out.append(self._greedy(ctx, B, 1))
        return np.stack(out, axis=1)
