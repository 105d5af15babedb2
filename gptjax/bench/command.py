"""The `gptjax bench` command line: flags, their parsing into suite.Options, and the four modes (suite,
--compare, --device-check, --study NAME)."""

from __future__ import annotations

import argparse

from gptjax import precision as registry
from gptjax.bench import studies, suite
from gptjax.bench.device_check import device_check
from gptjax.bench.report import compare_table, read_jsonl
from gptjax.errors import GptjaxError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `gptjax bench`."""
    p.add_argument("--suite", default="quick", choices=["quick", "full"], help="quick (default: byte-small, "
                   "prefill T128, decode B1/B8 32+32 tokens, train B4 T64, 5 runs) or full (gpt2, prefill "
                   "T128/T512, decode B1/4/8/16 32+128 tokens, train B8 T256, 7 runs)")
    p.add_argument("--preset", help="model shape (default: the suite's; gpt2 for the real comparison)")
    p.add_argument("--backend", default="jax", help="gptjax backend to measure (default jax; the train step "
                   "needs jax)")
    p.add_argument("--precision", default=",".join(registry.MODES), metavar="LIST", help="comma list of "
                   f"precision modes ({', '.join(registry.MODES)}; default all); a mode the backend refuses is "
                   "recorded as skipped")
    p.add_argument("--kv-cache", choices=list(registry.KV_CACHES), help="KV-cache storage passed to the backend "
                   "(default: the backend's)")
    p.add_argument("--batch", metavar="LIST", help="comma list of decode batch sizes (default: the suite's)")
    p.add_argument("--seq", metavar="LIST", help="comma list of prefill lengths at B=1 (default: the suite's)")
    p.add_argument("--new", type=int, metavar="N", help="new tokens per decode row (default: the suite's)")
    p.add_argument("--runs", type=int, metavar="N", help="timed runs per measurement, median reported")
    p.add_argument("--workloads", default="prefill,decode,train", metavar="LIST",
                   help="comma list of prefill, decode, train (default all)")
    p.add_argument("--peer", default="none", metavar="LIST", help="comma list of peers doing the same work on the "
                   "same weights in the same run, cells round-robin: llama.cpp, ct2 (CTranslate2), ort (ONNX "
                   "Runtime), each in its own process (the peers extra), hf (Hugging Face GPT-2 on PyTorch, the peer "
                   "extra); none (default)")
    p.add_argument("--peer-threads", type=int, metavar="N", help="CPU threads for the peers (default: as many as "
                   "XLA uses, one per core; fewer only when other work holds cores, and say so)")
    p.add_argument("--out", metavar="DIR", help="results directory (default runs/bench-<time>): results.jsonl, "
                   "results.md, plots/")
    p.add_argument("--no-plots", action="store_true", help="skip the plots (they need the bench extra)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS", help="record workloads not started by then "
                   "as skipped (default: none; 240 with --device-check)")
    p.add_argument("--matmul-n", type=int, metavar="N", help="matmul ceiling size N³ (default: 1024 on CPU "
                   "(2048 full), 8192 on accelerators)")
    p.add_argument("--bandwidth-mib", type=int, metavar="MIB", help="buffer for the bandwidth ceilings (default: "
                   "256 MiB on CPU (1 GiB full), 1 GiB on accelerators (4 GiB full))")
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="print the ratio table between two "
                   "results.jsonl files and exit")
    p.add_argument("--device-check", action="store_true", help="for a short accelerator lease: logits vs the "
                   "NumPy oracle on the device, then the quick suite (default preset gpt2) in under 5 minutes")
    p.add_argument("--study", nargs=argparse.REMAINDER, help="NAME [FLAGS]: a focused study instead of the suite, "
                   f"on the same harness: {', '.join(studies.STUDIES)}; the flags after NAME are the study's own "
                   "(`gptjax bench --study NAME --help` lists them); results in --out DIR (results.jsonl, results.md)")


def int_list(flag: str, text: str | None) -> tuple[int, ...] | None:
    """"1,8" -> (1, 8); a GptjaxError naming the flag for anything but positive integers."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise GptjaxError(f"{flag} {text!r}: give a comma list of positive integers, e.g. 1,8")
    return values


def options_from_args(args: argparse.Namespace) -> suite.Options:
    """suite.Options from the parsed flags."""
    return suite.Options(suite=args.suite, preset=args.preset, backend=args.backend,
                         precisions=tuple(p.strip() for p in args.precision.split(",") if p.strip()),
                         kv_cache=args.kv_cache, seqs=int_list("--seq", args.seq),
                         batches=int_list("--batch", args.batch), new=args.new, runs=args.runs,
                         workloads=tuple(w.strip() for w in args.workloads.split(",")),
                         peer=None if args.peer == "none" else args.peer, out=args.out, plots=not args.no_plots,
                         time_budget=args.time_budget, matmul_n=args.matmul_n, bandwidth_mib=args.bandwidth_mib,
                         peer_threads=args.peer_threads)


def main(args: argparse.Namespace) -> int:
    """Run `gptjax bench` with parsed flags: --compare, --device-check, --study, or the suite."""
    if args.study is not None:
        return studies.main(args.study, out=args.out)
    if args.compare:
        print(compare_table(read_jsonl(args.compare[0]), read_jsonl(args.compare[1])))
        return 0
    options = options_from_args(args)
    if args.device_check:
        return device_check(options)
    suite.run(options)
    return 0
