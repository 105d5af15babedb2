"""`gptjax generate`: continue a prompt with a checkpoint, printing the tokens as they arrive."""

from __future__ import annotations

import argparse
import sys
import time

from gptjax.backends import get_backend
from gptjax.cli.options import RUN_PRECISIONS, add_precision_flags, mesh_from
from gptjax.errors import GptjaxError
from gptjax.sampling import SamplingParams
from gptjax.speculative import ModelDraft, NgramDraft, gain_line, measure_gain
from gptjax.tokenizer import Tokenizer, checkpoint_tokenizer
from gptjax.weights import load_checkpoint, load_config, run_options, stored_precision

NAME = "generate"
HELP = "continue a prompt with a checkpoint, printing tokens as they arrive"
DESCRIPTION = ("Decode text (with the checkpoint's tokenizer, or bytes for a 256-symbol vocabulary) or raw token "
               "ids, streaming the continuation as it is produced.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `gptjax generate`."""
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint directory (config.json + "
                   "model.safetensors, tokenizer files optional)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="prompt text")
    what.add_argument("--tokens", help="prompt as comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to add (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy (default 1)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample within the nucleus of probability mass p")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--stop-token", type=int, action="append", default=[], metavar="ID",
                   help="end at this token id (repeatable)")
    p.add_argument("--backend", default="jax", help="backend name (default jax; see `gptjax backends`)")
    p.add_argument("--chunk-size", type=int, default=4, metavar="N", help="decode steps per streamed chunk")
    p.add_argument("--mesh", metavar="SPEC", help="jax backend over a device mesh, e.g. tensor=2")
    add_precision_flags(p)
    p.add_argument("--draft", metavar="DIR|ngram", help="speculative decoding: a draft checkpoint with the same "
                   "vocabulary, or `ngram` for prompt lookup (no model); greedy output is unchanged, sampled output "
                   "keeps its distribution; chunks are then --chunk-size verify rounds")
    p.add_argument("--spec-k", type=int, default=4, metavar="K", help="draft tokens proposed per target pass "
                   "(default 4)")
    p.add_argument("--draft-precision", choices=RUN_PRECISIONS, help="how to run the draft checkpoint's weights "
                   "(default: as it stores them)")
    p.add_argument("--ngram", default="3,1", metavar="MAX,MIN", help="with --draft ngram: the longest and shortest "
                   "n-gram looked up (default 3,1)")


def run(args: argparse.Namespace) -> int:
    """Stream the continuation to stdout (text, or ids for --tokens); a summary line to stderr."""
    config = load_config(args.checkpoint)
    tokenizer = checkpoint_tokenizer(args.checkpoint, config.vocab_size)
    prompt = _prompt(args, tokenizer, config.vocab_size)
    options = run_options(args.checkpoint, args.precision, args.kv_cache)
    mesh = mesh_from(args.mesh)
    if mesh is not None:
        options["mesh"] = mesh
    backend = get_backend(args.backend, config, **options)
    spec = {} if args.draft is None else {"draft": draft_from(args.draft, args.ngram, args.draft_precision),
                                          "num_speculative_tokens": args.spec_k}
    stream = backend.stream(load_checkpoint(args.checkpoint)[1], [prompt], args.max_new_tokens,
                            chunk_size=args.chunk_size, sampling=sampling_from(args), **spec)
    printer = _TextPrinter(tokenizer) if args.tokens is None else _IdPrinter()
    t0, reason, n, proposed, accepted = time.perf_counter(), "length", 0, 0, 0
    if args.tokens is None:
        sys.stdout.write(args.prompt)
    for chunk in stream:
        printer.add(chunk.tokens[0])
        n += len(chunk.tokens[0])
        reason = chunk.finish_reasons[0] or reason
        proposed, accepted = proposed + chunk.proposed, accepted + chunk.accepted
    seconds = time.perf_counter() - t0
    spec_note = f", {accepted}/{proposed} draft tokens accepted" if args.draft else ""
    print(f"\n[{n} tokens, finish_reason={reason}, {seconds:.2f} s incl. compile{spec_note}]", file=sys.stderr)
    if args.draft is not None:  # the time above includes compiling both paths: measure the gain without it
        weights = backend.prepare(load_checkpoint(args.checkpoint)[1])
        gain = measure_gain(backend, weights, [prompt], args.max_new_tokens, sampling_from(args), spec["draft"],
                            args.spec_k, rounds=3)
        print(gain_line(gain, 3), file=sys.stderr)
    return 0


def sampling_from(args: argparse.Namespace) -> SamplingParams:
    """The SamplingParams of the sampling flags (their ranges are SamplingParams' own checks)."""
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          stop_tokens=args.stop_token, greedy=args.greedy)


def draft_from(draft: str, ngram: str, precision: str | None) -> ModelDraft | NgramDraft:
    """The drafter --draft names: `ngram` (--ngram MAX,MIN) or a checkpoint directory (run in --draft-precision,
    default as stored)."""
    if draft == "ngram":
        try:
            longest, shortest = (int(n) for n in ngram.split(","))
        except ValueError:
            raise GptjaxError(f"--ngram {ngram!r} must be two integers MAX,MIN, e.g. 3,1") from None
        return NgramDraft(longest, shortest)
    config, params = load_checkpoint(draft)
    return ModelDraft(params, config, precision or stored_precision(draft))


def _prompt(args: argparse.Namespace, tokenizer: Tokenizer | None, vocab_size: int) -> list[int]:
    """The prompt's token ids: --tokens parsed, or --prompt encoded."""
    if args.tokens is not None:
        try:
            return [int(t) for t in args.tokens.split(",")]
        except ValueError:
            raise GptjaxError(f"--tokens {args.tokens!r} must be comma-separated integers, e.g. 1,2,3") from None
    if tokenizer is None:
        raise GptjaxError(f"{args.checkpoint} has no tokenizer files and a {vocab_size}-token vocabulary: "
                          "give the prompt as --tokens 1,2,3")
    return tokenizer.encode(args.prompt)


class _TextPrinter:
    """Prints the new text of a growing token list (decoding it whole, so multi-token characters come out right)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def add(self, ids: list[int]) -> None:
        self.ids += ids
        text = self.tokenizer.decode(self.ids)
        stable = text.rstrip("\ufffd")  # hold back a partial character until its last byte arrives
        sys.stdout.write(stable[len(self.shown):])
        sys.stdout.flush()
        self.shown = stable


class _IdPrinter:
    """Prints token ids, comma-separated, as they arrive."""

    def __init__(self) -> None:
        self.first = True

    def add(self, ids: list[int]) -> None:
        for i in ids:
            sys.stdout.write(("" if self.first else ",") + str(i))
            self.first = False
        sys.stdout.flush()
