"""`gptjax export`: a checkpoint in another engine's format (gguf: llama.cpp's), so a model trained here runs there."""

from __future__ import annotations

import argparse

from gptjax.errors import GptjaxError

NAME = "export"
FORMATS = ("gguf",)
HELP = "write a checkpoint as a GGUF file that llama.cpp loads and runs"
DESCRIPTION = ("--format gguf --checkpoint DIR --out FILE [--type f32|f16|bf16|q8_0|q4_0]: a gptjax or Hugging Face "
               "GPT-2 float checkpoint as one GGUF file (llama.cpp's `gpt2` architecture, the checkpoint's BPE "
               "vocabulary or gptjax's byte vocabulary), written atomically; needs the peers extra (gguf).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `gptjax export`."""
    p.add_argument("--format", default="gguf", help=f"output format ({', '.join(FORMATS)}; default gguf)")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a float checkpoint (gptjax or HF GPT-2)")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write (must not exist)")
    p.add_argument("--type", default="f32", dest="gguf_type", metavar="TYPE", help="storage of the matrices: f32 "
                   "(default), f16, bf16, q8_0 or q4_0 (norms and biases stay f32)")


def run(args: argparse.Namespace) -> int:
    """Export the checkpoint; print where it went."""
    if args.format not in FORMATS:
        raise GptjaxError(f"--format {args.format!r}; allowed: {', '.join(FORMATS)}")
    try:
        import gguf  # noqa: F401  (the peers extra: is it installed?)
    except ImportError:
        raise GptjaxError("export --format gguf needs the `gguf` package: pip install 'gptjax[peers]'") from None
    from gptjax.export import export_gguf

    out = export_gguf(args.checkpoint, args.out, args.gguf_type)
    print(f"wrote {out} ({args.gguf_type})")
    return 0
