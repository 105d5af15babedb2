"""`gptjax train`: train a GPT (by default a small byte-level model on the Python stdlib in about 3 minutes)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

from gptjax.cli.options import add_mesh_flag, mesh_from
from gptjax.config import GPTConfig, get_preset
from gptjax.errors import GptjaxError, read_json
from gptjax.tracing import Metrics, serve_metrics

NAME = "train"
HELP = "train a GPT (default: a small byte-level model on the Python stdlib, ~3 min)"
DESCRIPTION = ("Train a GPT with AdamW, checkpoints (orbax), evaluation and TensorBoard logs. With no arguments: "
               "the byte-mini preset on the running Python's standard library source. Overrides are key=value "
               "pairs for the model (n_layer=6) or training (lr=1e-3, batch_size=16, grad_accum=2, dropout=0.1, "
               "compute_dtype=bf16, ...).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `gptjax train`."""
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="model or training setting to change")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="model preset (default byte-mini)")
    src.add_argument("--config", metavar="FILE", help="JSON with \"preset\" or \"model\" and \"train\" settings")
    p.add_argument("--out", metavar="DIR", help="run directory (default runs/<timestamp>)")
    p.add_argument("--data", metavar="SPEC", help="stdlib (default), tinyshakespeare (downloaded), or a file, "
                   "directory or glob of text files")
    p.add_argument("--tokenizer", metavar="SPEC", help="byte (default), bpe:N or char:N (trained on the training split), "
                   "or a checkpoint directory with GPT-2 tokenizer files")
    p.add_argument("--init", metavar="CHECKPOINT", help="fine-tune this checkpoint (its shape, weights and "
                   "tokenizer files) instead of starting from GPT-2's random initialisation")
    p.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (default 300)")
    p.add_argument("--max-time", type=float, metavar="SECONDS", help="stop (evaluate, checkpoint, export) after this")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--skip-nonfinite", action="store_true", help="skip updates whose loss/gradients are not finite "
                   "(default: stop, keeping the last good checkpoint)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS", help="capture a jax.profiler trace of this "
                   "many steps (after compilation) into DIR/profile")
    p.add_argument("--peak-flops", type=float, metavar="FLOP/S", help="MFU denominator (default: $GPTJAX_PEAK_FLOPS, "
                   "else this machine's matmul ceiling, measured once and cached)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_mesh_flag(p, "train over a device mesh", "data=2,fsdp=2,tensor=2 (sizes may be -1: the rest of the devices)")
    p.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus /metrics on this port "
                   "while training")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="ADDR", help="address /metrics binds "
                   "(default 127.0.0.1; 0.0.0.0 lets a Prometheus container reach it)")


def run(args: argparse.Namespace) -> int:
    """Resolve the run's config, train, and print where the model and logs are; 1 when training stopped."""
    # gptjax.train imports jax, flax and optax (seconds): only this command pays for them
    from gptjax.train import TrainOptions, check_inputs, train

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("gptjax").setLevel(logging.INFO)
    config, tc, data_spec = _run_config(args)
    check_inputs(data_spec, None if args.resume else args.init)  # before anything is printed or created
    out = args.out or time.strftime("runs/%Y%m%d-%H%M%S")
    print(f"run directory: {out}\nmodel: {json.dumps(dataclasses.asdict(config))}\n"
          f"training: {json.dumps(dataclasses.asdict(tc))}", flush=True)
    mesh = mesh_from(args.mesh)
    metrics = None
    if args.metrics_port is not None:
        metrics = Metrics()
        serve_metrics(args.metrics_port, host=args.metrics_host, metrics=metrics)
        print(f"metrics: http://{args.metrics_host}:{args.metrics_port}/metrics", flush=True)
    options = TrainOptions(data_spec=data_spec, resume=args.resume, metrics=metrics, mesh=mesh,
                           max_time=args.max_time, skip_nonfinite=args.skip_nonfinite, profile_steps=args.profile,
                           peak_flops=args.peak_flops, progress=not args.no_progress, init_from=args.init)
    result = run_reporting_failures(NAME, lambda: train(config, tc, out, options))
    if result is None:
        return 1
    print(f"done: {result.steps} steps ({result.stop_reason}); validation loss {result.val_loss:.4f} nats/token "
          f"vs unigram baseline {result.unigram_loss:.4f}; {result.val_bpb:.3f} bits/byte\n"
          f"model: {out}/model (gptjax generate --checkpoint {out}/model --prompt 'def ')\n"
          f"TensorBoard: {tensorboard_hint(f'{out}/tb')}")
    return 0


def tensorboard_hint(logdir: str) -> str:
    """The command that shows logdir, with the install step first when tensorboard is not on PATH."""
    show = f"tensorboard --logdir {logdir}"
    return show if shutil.which("tensorboard") else f"pip install tensorboard (or '.[tour]'), then {show}"


def run_reporting_failures(command: str, start: Callable[[], Any]) -> Any:
    """start() (a train or distill run), its log lines above the progress bar; None, having printed one line, when
    it stopped (a non-finite loss) or the OS refused a write in the run (a full or read-only disk: WriteFailed
    names the run directory, a checkpoint or the export and the cause, and what was half-written is removed)."""
    from gptjax.train import TrainingStopped, WriteFailed  # jax: see run()

    try:
        with logging_redirect_tqdm():  # log lines above the progress bar, not through it
            return start()
    except TrainingStopped as e:
        print(f"gptjax {command}: stopped: {e}", file=sys.stderr)
    except WriteFailed as e:
        print(f"gptjax {command}: {e}", file=sys.stderr)
    return None


def _run_config(args: argparse.Namespace) -> tuple[GPTConfig, object, str | None]:
    """(model config, TrainConfig, data spec) from --resume's run.json, or --preset/--config and the overrides."""
    from gptjax.train import TrainConfig, config_from_overrides, load_run_config  # jax: see run()

    if args.resume:
        if not args.out:
            raise GptjaxError("--resume needs --out DIR of the run to continue")
        given = [flag for flag, value in (("--preset", args.preset), ("--config", args.config), ("--data", args.data),
                                           ("--tokenizer", args.tokenizer), ("--init", args.init)) if value]
        if given or args.overrides:
            raise GptjaxError(f"--resume continues the run as configured in {args.out}/run.json; drop "
                              f"{given + args.overrides} (only --max-steps and --max-time may be given)")
        config, tc, extra = load_run_config(Path(args.out) / "run.json")
        data_spec = extra.get("data")
    else:
        config, tc, data_spec = get_preset(args.preset or "byte-mini"), TrainConfig(), None
        if args.config:
            config, tc, data_spec = _config_file(args.config)
        if args.init and any(k.split("=")[0] in GPTConfig.__dataclass_fields__ for k in args.overrides):
            raise GptjaxError("--init fine-tunes the checkpoint's own shape: model overrides cannot apply")
        config, tc = config_from_overrides(config, tc, args.overrides)
        data_spec = args.data or data_spec
    if args.tokenizer is not None:
        tc = dataclasses.replace(tc, tokenizer=args.tokenizer)
    if args.max_steps is not None:
        tc = dataclasses.replace(tc, max_steps=args.max_steps)
    return config, tc, data_spec


def _config_file(path: str) -> tuple[GPTConfig, object, str | None]:
    """(model config, TrainConfig, data spec) of a --config JSON file."""
    from gptjax.train import TrainConfig  # jax: see run()

    try:
        spec = read_json(path)
    except GptjaxError as e:
        raise GptjaxError(f"--config: {e}") from None
    if not isinstance(spec, dict) or not set(spec) <= {"preset", "model", "train", "data"}:
        raise GptjaxError(f"--config {path}: expected a JSON object with keys preset, model, train, data")
    config = get_preset(spec.get("preset", "byte-mini"))
    try:
        config = config.replace(**spec.get("model", {}))
        tc = dataclasses.replace(TrainConfig(), **spec.get("train", {}))
    except TypeError as e:
        raise GptjaxError(f"--config {path}: {e}") from None
    return config, tc, spec.get("data")

