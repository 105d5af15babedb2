"""The suite: which workloads a quick or full run measures, the runner (ceilings first, then each measurement
group: one workload shape and one weight width, gptjax's modes of that width and every peer variant of it, all
cells round-robin with the order rotated each round), and the rows it writes."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any

from gptjax import precision as registry
from gptjax.bench import metrics
from gptjax.bench.ceilings import datasheet_for, measure_ceilings
from gptjax.bench.env import device_memory
from gptjax.bench.peers import PROCESS_PEERS, parse_peers, width
from gptjax.bench.peers.hf import require_peer
from gptjax.bench.peers.lineup import Lineup, PeerCell
from gptjax.bench.plots import make_plots
from gptjax.bench.report import ceilings_table, markdown_table
from gptjax.bench.results import Results, open_results
from gptjax.bench.workloads import Job, Shape, ours
from gptjax.config import GPTConfig, get_preset
from gptjax.errors import GptjaxError
from gptjax.timing import interleaved_runs, latency_summary, load_average, median, timed
from gptjax.weights import init_params

WORKLOADS = ("prefill", "decode", "train")


@dataclass(frozen=True)
class SuiteSpec:
    """What a suite measures by default (each field can be overridden from the command line)."""

    preset: str
    seqs: tuple[int, ...]  # prefill lengths (B=1)
    batches: tuple[int, ...]  # decode batch sizes
    prompt: int
    new: int
    train_batch: int
    train_seq: int
    runs: int
    matmul_n: tuple[int, int]  # (CPU, accelerator)
    bandwidth_mib: tuple[int, int]


SUITES = {
    "quick": SuiteSpec("byte-small", (128,), (1, 8), 32, 32, 4, 64, 5, (1024, 8192), (256, 1024)),
    "full": SuiteSpec("gpt2", (128, 512), (1, 4, 8, 16), 32, 128, 8, 256, 7, (2048, 8192), (1024, 4096)),
}


@dataclass(frozen=True)
class Options:
    """One `gptjax bench` run, resolved: the suite's defaults with the command line's overrides."""

    suite: str = "quick"
    preset: str | None = None
    backend: str = "jax"
    precisions: tuple[str, ...] = tuple(registry.MODES)  # every run mode the registry declares
    kv_cache: str | None = None
    seqs: tuple[int, ...] | None = None
    batches: tuple[int, ...] | None = None
    new: int | None = None
    runs: int | None = None
    workloads: tuple[str, ...] = WORKLOADS
    peer: str | None = None  # comma list of gptjax.bench.peers.PEERS
    out: str | None = None
    plots: bool = True
    time_budget: float | None = None  # seconds; workloads not started by then are recorded as skipped
    peer_threads: int | None = None  # torch's CPU threads for the peer (default: as many as XLA, one per core)
    matmul_n: int | None = None  # ceiling sizes (default: the suite's for this platform)
    bandwidth_mib: int | None = None

    def spec(self) -> SuiteSpec:
        """The suite's defaults with this run's overrides applied."""
        s = SUITES[self.suite]
        changes = {"preset": self.preset, "seqs": self.seqs, "batches": self.batches, "new": self.new,
                   "runs": self.runs}
        return dataclasses.replace(s, **{k: v for k, v in changes.items() if v is not None})


def validate(options: Options) -> tuple[SuiteSpec, GPTConfig]:
    """The resolved spec and config, or a GptjaxError naming the bad value and what is allowed."""
    if options.suite not in SUITES:
        raise GptjaxError(f"--suite {options.suite!r}; allowed: {', '.join(SUITES)}")
    spec = options.spec()
    config = get_preset(spec.preset)
    spec = _fit_defaults(spec, options, config.n_positions)
    for p in options.precisions:
        if p not in registry.MODES:
            raise GptjaxError(f"--precision {p!r}; allowed: {', '.join(registry.MODES)}")
    for w in options.workloads:
        if w not in WORKLOADS:
            raise GptjaxError(f"--workloads {w!r}; allowed: {', '.join(WORKLOADS)}")
    parse_peers(options.peer)
    if spec.runs < 1:
        raise GptjaxError(f"--runs {spec.runs} must be >= 1")
    for flag, v in (("--matmul-n", options.matmul_n), ("--bandwidth-mib", options.bandwidth_mib),
                    ("--peer-threads", options.peer_threads)):
        if v is not None and v < 1:
            raise GptjaxError(f"{flag} {v} must be >= 1")
    _check_lengths(config, spec)
    return spec, config


def _fit_defaults(spec: SuiteSpec, options: Options, context: int) -> SuiteSpec:
    """The suite's default lengths shrunk to a small context (lengths given on the command line are kept)."""
    seqs = spec.seqs if options.seqs else tuple(sorted({min(T, context) for T in spec.seqs}))
    prompt = min(spec.prompt, context // 2)
    new = spec.new if options.new else min(spec.new, context - prompt)
    return dataclasses.replace(spec, seqs=seqs, prompt=prompt, new=new, train_seq=min(spec.train_seq, context))


def _check_lengths(config: GPTConfig, spec: SuiteSpec) -> None:
    P = config.n_positions
    for name, values in (("--batch", spec.batches), ("--seq", spec.seqs)):
        if not values or any(v < 1 for v in values):
            raise GptjaxError(f"{name} {','.join(map(str, values))}: give positive integers, e.g. 1,8")
    if max(spec.seqs) > P:
        raise GptjaxError(f"--seq {max(spec.seqs)} exceeds the context n_positions={P} of {spec.preset}")
    if spec.new < 1 or spec.prompt + spec.new > P:
        raise GptjaxError(f"--new {spec.new}: prompt {spec.prompt} + new must be in [{spec.prompt + 1}, {P}]")


def plan(options: Options, spec: SuiteSpec) -> list[tuple[Shape, tuple[str, ...]]]:
    """The measurement groups, in order: per weight width (in --precision's order), each workload's shapes, with
    the requested modes of that width (measured together with the peers' variants of that width)."""
    shapes = {"prefill": [Shape("prefill", 1, seq=T) for T in spec.seqs],
              "decode": [Shape("decode", B, prompt=spec.prompt, new=spec.new) for B in spec.batches],
              "train": [Shape("train", spec.train_batch, seq=spec.train_seq)]}
    widths = {width(p): tuple(q for q in options.precisions if width(q) == width(p)) for p in options.precisions}
    return [(s, modes) for modes in widths.values() for w in WORKLOADS if w in options.workloads for s in shapes[w]]


def require_peers(names: tuple[str, ...]) -> None:
    """Raise a GptjaxError naming the extra to install when a peer's packages are missing."""
    import importlib.util

    if "hf" in names:
        require_peer()
    packages = {"llama.cpp": ("llama_cpp", "gguf"), "ct2": ("ctranslate2",), "ort": ("onnxruntime", "onnx")}
    for name in (n for n in names if n in PROCESS_PEERS):
        missing = [m for m in packages[name] if importlib.util.find_spec(m) is None]
        if missing:
            raise GptjaxError(f"--peer {name} needs the `peers` extra (pip install 'gptjax[peers]'): "
                              f"{', '.join(missing)} not installed")


def ceiling_sizes(spec: SuiteSpec, options: Options, platform: str) -> tuple[int, int]:
    """(matmul n, bandwidth bytes): the options', else the suite's for this platform (small enough for a CPU,
    big enough for an accelerator)."""
    accel = platform != "cpu"
    return options.matmul_n or spec.matmul_n[accel], (options.bandwidth_mib or spec.bandwidth_mib[accel]) * 2**20


def run(options: Options, log: Any = print) -> list[dict[str, Any]]:
    """Run the suite; write DIR/results.jsonl (line by line, so an interrupted run keeps what it measured),
    DIR/results.md and plots; return every row."""
    spec, config = validate(options)
    peers = parse_peers(options.peer)
    require_peers(peers)
    deadline = time.monotonic() + options.time_budget if options.time_budget else None
    results = open_results(options.out or time.strftime("runs/bench-%Y%m%d-%H%M%S"), log, options.peer_threads,
                           peer=bool(peers))
    ceiling = _ceilings(spec, options, results.env, log)
    rows = [results.environment_row] + results.write([{"kind": "ceiling"} | ceiling])
    params = init_params(config, seed=0)
    lineup = Lineup(peers, config, params, results.out, results.env["peer_threads"])
    groups = plan(options, spec)
    try:
        for n, (shape, modes) in enumerate(groups):
            if deadline is not None and time.monotonic() > deadline:
                new = _skipped(results.base, spec, shape, modes, options, "time budget spent")
            else:
                new = measure(results.base, spec, config, params, shape, modes, options, ceiling, lineup, log)
            rows += results.write(new)
            if n + 1 == len(groups) or width(groups[n + 1][1][0]) != width(modes[0]):
                lineup.release(modes[0])  # this width's groups are done: free the peers' models of it
    finally:
        lineup.close()
    _finish(rows, results, options, ceiling, spec, log)
    return rows


def _ceilings(spec: SuiteSpec, options: Options, env: dict[str, Any], log: Any) -> dict[str, Any]:
    n, nbytes = ceiling_sizes(spec, options, env["platform"])
    log(f"measuring ceilings: matmul {n}³ per dtype, memory {nbytes / 2**20:.0f} MiB ...")
    ceiling = measure_ceilings(n, nbytes)
    sheet = datasheet_for(env["device_kind"])
    ceiling["datasheet"] = dataclasses.asdict(sheet) if sheet else None
    return ceiling


def _identity(spec: SuiteSpec, shape: Shape, precision: str, options: Options, backend: str) -> dict[str, Any]:
    return {"kind": "workload", "workload": shape.workload, "backend": backend, "precision": precision,
            "kv_cache": options.kv_cache, "preset": spec.preset, "batch": shape.batch, "seq": shape.seq,
            "prompt": shape.prompt, "new": shape.new}


def _skipped(base: dict, spec: SuiteSpec, shape: Shape, modes: tuple[str, ...], options: Options, message: str
             ) -> list[dict[str, Any]]:
    """A skipped row per mode (the peers' variants are not run either)."""
    return [base | _identity(spec, shape, p, options, options.backend) | {"status": "skipped", "message": message}
            for p in modes]


def measure(base: dict, spec: SuiteSpec, config: GPTConfig, params: dict, shape: Shape, modes: tuple[str, ...],
            options: Options, ceiling: dict[str, Any], lineup: Lineup, log: Any) -> list[dict[str, Any]]:
    """Rows for one group: gptjax's modes and the peers' variants of their width, timed round-robin (order
    rotated each round); a skipped row for a mode the backend refuses, a row for a variant not timed."""
    log(f"{shape.workload} {shape.label} {'/'.join(modes)} ...")
    jobs, rows = {}, []
    for p in modes:
        try:
            jobs[p] = ours(options.backend, config, params, shape, p, options.kv_cache)
        except GptjaxError as e:
            rows += _skipped(base, spec, shape, (p,), options, str(e))
    if not jobs:
        return rows
    cells, untimed = lineup.cells(shape, modes)
    calls, compile_s = _calls(jobs, cells)
    times = interleaved_runs(calls, spec.runs, warmup=1, rotate=True)
    ours_rows = [_ours_row(base | _identity(spec, shape, p, options, options.backend), shape, job, times, p,
                           ceiling) | {"compile_s": max(0.0, compile_s[p] - median(times[p]))}
                 for p, job in jobs.items()]
    job = next(iter(jobs.values()))
    peer_rows = [_peer_row(base | _identity(spec, shape, c.variant, options, c.backend), shape, job, c, times,
                           ceiling) for c in cells]
    _versus(ours_rows, peer_rows)
    return rows + ours_rows + peer_rows + [base | _identity(spec, shape, r["precision"], options, r["backend"]) | r
                                           for r in untimed]


def _calls(jobs: dict[str, Job], cells: list[PeerCell]) -> tuple[dict[str, Any], dict[str, float]]:
    """Every timed call of a group by name (seconds per call i), and gptjax's first-call seconds per mode (the
    compile); decode also times the prompt alone (a one-token generate, subtracted from the whole call)."""
    calls, compile_s = {}, {}
    for p, job in jobs.items():
        compile_s[p] = timed(lambda job=job: job.call(-1))  # compiles (jit) and converts: excluded from the timed runs
        calls[p] = lambda i, job=job: timed(lambda: job.call(i))
        if job.prompt is not None:
            job.prompt(-1)  # its own compile
            calls[p + " prompt"] = lambda i, job=job: timed(lambda: job.prompt(i))
    for c in cells:
        calls[f"{c.backend} {c.variant}"] = c.call
        if c.prompt is not None:
            calls[f"{c.backend} {c.variant} prompt"] = c.prompt
    return calls, compile_s


def _ours_row(row: dict[str, Any], shape: Shape, job: Job, times: dict[str, list[float]], mode: str,
              ceiling: dict[str, Any]) -> dict[str, Any]:
    return _row(row, shape, job, times[mode], ceiling, job.latencies) | _decode_rate(shape, times, mode)


def _peer_row(row: dict[str, Any], shape: Shape, job: Job, cell: PeerCell, times: dict[str, list[float]],
              ceiling: dict[str, Any]) -> dict[str, Any]:
    """A peer variant's row: its throughput and latency, FLOPs of the same work; no bytes (its storage differs)."""
    name = f"{cell.backend} {cell.variant}"
    t = median(times[name])
    row |= {"status": "ok", "runs": len(times[name]), "times_s": times[name], "median_s": t,
            "tokens_per_s": shape.tokens / t, "flops": job.flops, "flops_per_s": job.flops / t,
            "compute_dtype": None, "latency_s": latency_summary(times[name]), "load_avg_1m": load_average(),
            "memory": {}} | cell.fields | _decode_rate(shape, times, name)
    row |= metrics.mfu_fields(row, row["flops_per_s"], ceiling, kernels=False)
    if cell.latencies is not None:
        extra = cell.latencies()
        row |= {"ttft_s": extra["ttft_s"], "latency_s": latency_summary(extra["per_token_s"]),
                "per_token_s": extra["per_token_s"], "call_latency_s": latency_summary(times[name])}
    return row


def _decode_rate(shape: Shape, times: dict[str, list[float]], name: str) -> dict[str, Any]:
    """Decode's tokens/s without the prompt: new tokens / (whole call - the prompt alone), medians."""
    if name + " prompt" not in times:
        return {}
    prompt = median(times[name + " prompt"])
    steps = median(times[name]) - prompt  # not positive only when noise swamps a tiny model's steps
    return {"prompt_s": prompt, "prompt_times_s": times[name + " prompt"],
            "decode_tokens_per_s": shape.tokens / steps if steps > 0 else None}


def _rate(row: dict[str, Any]) -> float:
    return row.get("decode_tokens_per_s") or row["tokens_per_s"]


def _versus(ours_rows: list[dict[str, Any]], peer_rows: list[dict[str, Any]]) -> None:
    """Each gptjax row's speed over the best peer's (above 1 gptjax is faster; decode without the prompt), and
    over each peer variant's."""
    if not peer_rows:
        return
    best = max(peer_rows, key=_rate)
    for r in ours_rows:
        r |= {"vs_peer": _rate(r) / _rate(best), "best_peer": f"{best['backend']} {best['precision']}",
              "vs_peers": {f"{p['backend']} {p['precision']}": _rate(r) / _rate(p) for p in peer_rows}}


def _row(row: dict[str, Any], shape: Shape, job: Job, times: list[float], ceiling: dict[str, Any],
         latencies: Any) -> dict[str, Any]:
    """One measurement: throughput, latency percentiles, FLOP/s and MFU, bytes/s and bandwidth use, memory."""
    t = median(times)
    flops_per_s, bytes_per_s = job.flops / t, job.bytes_moved / t
    dtype = metrics.COMPUTE_DTYPE[row["precision"]]
    sheet = ceiling.get("datasheet") or {}
    xla = metrics.utilisation(flops_per_s, ceiling["matmul_flops"].get(dtype))
    row |= {"status": "ok", "runs": len(times), "times_s": times, "median_s": t, "tokens_per_s": shape.tokens / t,
            "flops": job.flops, "flops_per_s": flops_per_s, "compute_dtype": dtype,
            # mfu: against the matmul the row runs on; mfu_xla (alias mfu_measured, read by --compare and the
            # docs until they move to mfu): against XLA's dot of the compute dtype, as before issue 30
            **metrics.mfu_fields(row, flops_per_s, ceiling, kernels=row.get("backend", "jax") == "jax"),
            "mfu_xla": xla, "mfu_measured": xla,
            "mfu_datasheet": metrics.utilisation(flops_per_s, (sheet.get("flops") or {}).get(dtype)),
            "mfu_kernel": metrics.utilisation(flops_per_s, ceiling.get("kernel_flops", {}).get(dtype)),
            "bytes_moved": job.bytes_moved, "bytes_per_s": bytes_per_s,
            "bw_use_measured": metrics.utilisation(bytes_per_s, ceiling["bandwidth"]["read"]),
            "bw_use_datasheet": metrics.utilisation(bytes_per_s, sheet.get("hbm_bytes_per_s")),
            "memory": job.memory | device_memory(), "latency_s": latency_summary(times),
            "load_avg_1m": load_average()} | job.notes
    if latencies is not None:
        extra = latencies()
        row |= {"ttft_s": extra["ttft_s"], "latency_s": latency_summary(extra["per_token_s"]),
                "per_token_s": extra["per_token_s"], "call_latency_s": latency_summary(times)}
    return row


def _finish(rows: list[dict[str, Any]], results: Results, options: Options, ceiling: dict[str, Any],
            spec: SuiteSpec, log: Any) -> None:
    loads = [r["load_avg_1m"] for r in rows if r.get("load_avg_1m") is not None]
    busy = loads and max(loads) > (os.cpu_count() or 1)
    load = (f"\n1-minute load average after each measurement: {min(loads):.1f} to {max(loads):.1f} on "
            f"{os.cpu_count()} cores{' (above the core count: other work competed for the CPU)' if busy else ''}\n"
            if loads else "")
    if options.plots:
        log(make_plots(rows, results.out))
    results.finish(f"gptjax bench --suite {options.suite}, {spec.preset}, median of {spec.runs} runs",
                   f"{ceilings_table(ceiling)}\n\n{markdown_table(rows)}\n{load}\n{metrics.FORMULAS}", log)
