"""Exports of a gptjax (or Hugging Face GPT-2) checkpoint into other engines' formats: gguf (llama.cpp's file)."""

from gptjax.export.gguf import GGUF_TYPES, export_gguf

__all__ = ["GGUF_TYPES", "export_gguf"]
