"""Accuracy next to speed per precision mode, measured by lm-evaluation-harness against `gptjax serve`.

    gptjax train                                   # the quickstart model (byte-mini on the stdlib's Python)
    gptjax bench --study lm-eval --checkpoint runs/<time>/model --docs 100

Builds a next-line task from held-out Python (the validation split of the training corpus: the running
interpreter's standard library, as `gptjax train` splits it): each document is --context bytes of a file, the
true next line and 3 other lines from held-out files as distractors; lm-eval's `multiple_choice` picks the
line with the highest log-likelihood (acc; acc_norm divides by the line's length in bytes; the mean
log-likelihood of the true line per byte shows what accuracy hides until a choice flips). Then a
`generate_until` task: the greedy continuation until "\\n" must equal the true next line (exact_match). For each
--modes precision mode it starts `gptjax serve --precision MODE` on 127.0.0.1 (a subprocess; needs the eval
extra), runs lm-eval's `local-completions` model with the server's remote tokenizer on both tasks (the task
files and data go to a temporary directory; nothing is downloaded), and reports the accuracies next to the
tokens/s of each task (scored tokens per second of the multiple-choice run, generated tokens per second of the
generation run from the server's counter; wall clock of lm-eval's whole evaluation, client overhead included,
after a warm-up pass over --batch-size documents of each task compiled the shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from gptjax import data
from gptjax.bench.results import Outcome
from gptjax.bench.server import free_port, start_server
from gptjax.errors import GptjaxError

FLAGS = {"--checkpoint": (None, "the checkpoint to evaluate (a byte-level or BPE checkpoint with its tokenizer)"),
         "--modes": ("fp32,bf16,int8,w8a8", "comma list of precision modes"),
         "--docs": (100, "documents per task"), "--context": (96, "context bytes before the line to predict"),
         "--max-line": (24, "longest line (bytes) used as a target"), "--seed": (0, "task sampling seed"),
         "--batch-size": (16, "prompts per request lm-eval sends")}


def prepare(args: argparse.Namespace) -> None:
    """Check the flags and that lm-eval (the eval extra) can be imported."""
    if args.checkpoint is None or not (Path(args.checkpoint) / "config.json").is_file():
        raise GptjaxError(f"--checkpoint {args.checkpoint!r}: give a checkpoint directory (e.g. runs/<time>/model "
                          "from `gptjax train`)")
    if min(args.docs, args.context, args.max_line, args.batch_size) < 1:
        raise GptjaxError("--docs, --context, --max-line and --batch-size must be >= 1")
    try:  # the eval extra is optional: is it installed?
        import lm_eval  # noqa: F401
    except ImportError:
        raise GptjaxError("--study lm-eval needs lm-evaluation-harness: pip install 'gptjax[eval]'") from None


def _held_out_lines(seed: int, context: int, max_line: int, docs: int) -> list[dict[str, Any]]:
    """Next-line documents from the validation split of the stdlib corpus: context, line, 3 distractors."""
    _, val = data.split_docs(data.stdlib_corpus())
    rng = random.Random(seed)
    pool: list[tuple[str, str]] = []  # (context, next line), the line non-blank and short
    for doc in val:
        text = doc[1]  # (name, text)
        if not text.isascii():
            continue
        starts = [i + 1 for i, ch in enumerate(text) if ch == "\n"]
        for s in starts:
            end = text.find("\n", s)
            line = text[s:end]
            if end > 0 and s >= context and 4 <= len(line.strip()) and len(line) <= max_line:
                pool.append((text[s - context:s], line))
    if len(pool) < docs + 3:
        raise GptjaxError(f"only {len(pool)} held-out lines qualify; lower --docs or --context")
    picked = rng.sample(pool, docs)
    lines = [line for _, line in pool]
    out = []
    for ctx, line in picked:
        others = [x for x in rng.sample(lines, 8) if x != line][:3]
        choices = [line, *others]
        rng.shuffle(choices)
        out.append({"context": ctx, "choices": choices, "answer": choices.index(line), "target": line})
    return out


TASK_MC = """task: gptjax_next_line_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
target_delimiter: ""
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
TASK_GEN = """task: gptjax_next_line_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen}
metric_list:
  - metric: exact_match
"""


def _write_tasks(folder: Path, docs: list[dict[str, Any]], max_line: int) -> None:
    data = folder / "next_line.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "mc.yaml").write_text(TASK_MC.format(data=data))
    (folder / "gen.yaml").write_text(TASK_GEN.format(data=data, max_gen=max_line + 1))


def _serve(checkpoint: str, mode: str, port: int) -> subprocess.Popen:
    """`gptjax serve --precision mode` on 127.0.0.1:port, once /health answers 200."""
    return start_server(["--checkpoint", checkpoint, "--precision", mode, "--request-timeout", "600",
                         "--max-queue", "256"], port, quiet=True)


def _evaluate(url: str, model: str, task: str, folder: Path, args: argparse.Namespace,
              limit: int | None = None) -> tuple[dict, float]:
    """lm-eval's results for one task (its first `limit` documents) and its wall-clock seconds."""
    import httpx  # optional, checked by prepare()
    import lm_eval  # the eval extra, checked by prepare()
    from lm_eval.tasks import TaskManager  # the eval extra

    context = httpx.get(url + "/tokenizer_info").json()["model_max_length"]
    model_args = {"model": model, "base_url": url + "/v1/completions", "tokenizer_backend": "remote",
                  "max_length": context, "batch_size": args.batch_size, "timeout": 600}
    manager = TaskManager(include_path=str(folder))
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model="local-completions", model_args=model_args, tasks=[task], limit=limit,
                                  log_samples=True, task_manager=manager)
    return out, time.perf_counter() - t0


def _scored_tokens(samples: list[dict[str, Any]], url: str) -> int:
    """Tokens the server scored: every context + choice (plus the one token each such request generates)."""
    import httpx  # optional, checked by prepare()

    def count(text: str) -> int:
        return httpx.post(url + "/tokenize", json={"prompt": text}).json()["count"]

    return sum(count(ctx + cont) + 1 for s in samples for ctx, cont in s["arguments"])


def _generated_tokens(url: str) -> float:
    """The server's generated-token counter (/metrics)."""
    import httpx  # optional, checked by prepare()

    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("gptjax_generated_tokens_total"):
            return float(line.rsplit(" ", 1)[1])
    raise GptjaxError("the server's /metrics has no gptjax_generated_tokens_total")


def run(args: argparse.Namespace, log: Any) -> Outcome:
    """Each mode: serve, evaluate both tasks, stop the server; one row per mode."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    docs = _held_out_lines(args.seed, args.context, args.max_line, args.docs)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gptjax-lm-eval-") as tmp:
        folder = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(folder / "cache")
        _write_tasks(folder, docs, args.max_line)
        for mode in args.modes.split(","):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = _serve(args.checkpoint, mode, port)
            try:
                model = Path(args.checkpoint).name
                for task in ("gptjax_next_line_mc", "gptjax_next_line_gen"):  # compile the shapes before timing
                    _evaluate(url, model, task, folder, args, limit=args.batch_size)
                mc, mc_s = _evaluate(url, model, "gptjax_next_line_mc", folder, args)
                before = _generated_tokens(url)
                gen, gen_s = _evaluate(url, model, "gptjax_next_line_gen", folder, args)
                gen_tokens = _generated_tokens(url) - before
                mc_tokens = _scored_tokens(mc["samples"]["gptjax_next_line_mc"], url)
            finally:
                proc.terminate()
                proc.wait(60)
            r_mc, r_gen = mc["results"]["gptjax_next_line_mc"], gen["results"]["gptjax_next_line_gen"]
            true_ll = _true_line_logprob(mc["samples"]["gptjax_next_line_mc"])
            row = {"precision": mode, "docs": args.docs, "acc": r_mc["acc,none"], "acc_stderr": r_mc["acc_stderr,none"],
                   "acc_norm": r_mc["acc_norm,none"], "exact_match": r_gen["exact_match,none"],
                   "true_line_logprob_per_byte": true_ll,
                   "mc_seconds": mc_s, "mc_tokens": mc_tokens, "mc_tokens_per_s": mc_tokens / mc_s,
                   "gen_seconds": gen_s, "gen_tokens": gen_tokens, "gen_tokens_per_s": gen_tokens / gen_s,
                   "lm_eval": lm_eval_version()}
            log(f"  {mode}: acc {row['acc']:.3f}, exact_match {row['exact_match']:.3f}, "
                f"{row['mc_tokens_per_s']:.0f} scored tok/s, {row['gen_tokens_per_s']:.0f} generated tok/s")
            rows.append(row)
    title = f"lm-eval next-line accuracy per precision mode ({args.docs} held-out lines, {args.checkpoint})"
    return Outcome(rows, title, table(rows))


def _true_line_logprob(samples: list[dict[str, Any]]) -> float:
    """Mean over documents of lm-eval's log-likelihood of the true line, per byte of it: the finer signal
    (accuracy moves only when a mode flips a choice)."""
    values = [s["filtered_resps"][s["doc"]["answer"]][0] / len(s["doc"]["target"].encode()) for s in samples]
    return sum(values) / len(values)


def lm_eval_version() -> str:
    """The installed lm-evaluation-harness version."""
    return version("lm_eval")


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per precision mode."""
    head = ("| precision | next-line acc (4 choices) | acc_norm | true line log-prob / byte | greedy exact match | "
            "scored tok/s | generated tok/s |\n|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['precision']} | {r['acc']:.3f} ± {r['acc_stderr']:.3f} | {r['acc_norm']:.3f} | "
        f"{r['true_line_logprob_per_byte']:.5f} | {r['exact_match']:.3f} | {r['mc_tokens_per_s']:,.0f} | "
        f"{r['gen_tokens_per_s']:,.0f} |\n" for r in rows)
