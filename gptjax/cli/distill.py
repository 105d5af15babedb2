"""`gptjax distill`: train a smaller student GPT on a teacher checkpoint's soft targets (gptjax.distill)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time

from gptjax import precision as registry
from gptjax.cli.options import add_mesh_flag, mesh_from
from gptjax.cli.train import run_reporting_failures
from gptjax.config import GPTConfig, get_preset
from gptjax.errors import GptjaxError

NAME = "distill"
HELP = "train a smaller student on a teacher checkpoint's soft targets (knowledge distillation)"
DESCRIPTION = ("Knowledge distillation: loss = alpha * tau^2 * KL(teacher_tau || student_tau) + (1 - alpha) * "
               "cross-entropy, the teacher's logits computed by its jitted forward pass on every batch. The student "
               "is the teacher's shape (or --preset) with the KEY=VALUE overrides (n_layer=2 n_embd=128 ..., and "
               "training settings as for `gptjax train`); it reads the teacher's tokenizer. Checkpoints, --resume, "
               "TensorBoard (train/ce, train/kl, train/top1_agreement) and the exported model are gptjax train's.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `gptjax distill`."""
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="student model or training setting")
    p.add_argument("--teacher", metavar="CHECKPOINT", help="the teacher checkpoint directory (required unless "
                   "--resume)")
    p.add_argument("--preset", help="the student's base shape (default: the teacher's)")
    p.add_argument("--alpha", type=float, help="weight of the soft term in [0, 1] (default 0.5)")
    p.add_argument("--temperature", type=float, help="softmax temperature tau > 0 (default 2)")
    p.add_argument("--teacher-precision", choices=list(registry.MODES), help="run mode of the teacher's forward "
                   "pass (default: as its checkpoint is stored)")
    p.add_argument("--init-from-teacher", action="store_true", help="start from every other teacher layer plus "
                   "its embeddings (DistilGPT2 style; needs the teacher's width)")
    p.add_argument("--out", metavar="DIR", help="run directory (default runs/distill-<timestamp>)")
    p.add_argument("--data", metavar="SPEC", help="corpus, as for gptjax train (default: the stdlib)")
    p.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (default 300)")
    p.add_argument("--max-time", type=float, metavar="SECONDS", help="stop (evaluate, checkpoint, export) after this")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--skip-nonfinite", action="store_true", help="skip updates whose loss/gradients are not finite")
    p.add_argument("--peak-flops", type=float, metavar="FLOP/S", help="MFU denominator (default: $GPTJAX_PEAK_FLOPS, "
                   "else this machine's matmul ceiling, measured once and cached)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_mesh_flag(p, "train over a device mesh", "data=2,fsdp=2,tensor=2")


def run(args: argparse.Namespace) -> int:
    """Resolve the student and the distillation settings, check them all, distil, and say where things are."""
    from gptjax.distill import distill  # jax, flax, optax: only this command pays for them
    from gptjax.train import TrainOptions

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("gptjax").setLevel(logging.INFO)
    config, tc, dc = _settings(args)
    out = args.out or time.strftime("runs/distill-%Y%m%d-%H%M%S")
    options = TrainOptions(data_spec=args.data, resume=args.resume, mesh=mesh_from(args.mesh),
                           max_time=args.max_time, skip_nonfinite=args.skip_nonfinite, peak_flops=args.peak_flops,
                           progress=not args.no_progress)
    if not args.resume:
        print(f"run directory: {out}\nteacher: {dc.teacher}\nstudent: {json.dumps(dataclasses.asdict(config))}",
              flush=True)
    result = run_reporting_failures(NAME, lambda: distill(config, tc, dc, out, options))
    if result is None:
        return 1
    print(f"done: {result.steps} steps ({result.stop_reason}); validation loss {result.val_loss:.4f} nats/token, "
          f"{result.val_bpb:.3f} bits/byte\nmodel: {out}/model\nTensorBoard: tensorboard --logdir {out}/tb")
    return 0


def _settings(args: argparse.Namespace) -> tuple[GPTConfig | None, object, object]:
    """(student config, TrainConfig, DistillConfig); on --resume (None, max_steps only, None): the saved ones."""
    from gptjax.distill import DistillConfig
    from gptjax.train import TrainConfig, config_from_overrides
    from gptjax.weights import load_config

    if args.resume:
        if not args.out:
            raise GptjaxError("--resume needs --out DIR of the run to continue")
        given = [f for f, v in (("--teacher", args.teacher), ("--preset", args.preset), ("--data", args.data),
                                ("--alpha", args.alpha is not None),
                                ("--temperature", args.temperature is not None),
                                ("--teacher-precision", args.teacher_precision),
                                ("--init-from-teacher", args.init_from_teacher)) if v] + args.overrides
        if given:
            raise GptjaxError(f"--resume continues the run as configured in {args.out}/run.json; drop {given}")
        tc = None if args.max_steps is None else dataclasses.replace(TrainConfig(), max_steps=args.max_steps)
        return None, tc, None
    if not args.teacher:
        raise GptjaxError("--teacher CHECKPOINT is required (the model to distil)")
    chosen = {k: v for k, v in (("alpha", args.alpha), ("temperature", args.temperature)) if v is not None}
    dc = DistillConfig(args.teacher, teacher_precision=args.teacher_precision,
                       init_from_teacher=args.init_from_teacher, **chosen)
    teacher = load_config(args.teacher)  # names a missing teacher before anything else
    base = get_preset(args.preset) if args.preset else teacher
    if not any(o.split("=")[0] == "vocab_size" for o in args.overrides):
        base = base.replace(vocab_size=teacher.vocab_size)  # the teacher's vocabulary unless told otherwise
    config, tc = config_from_overrides(base, TrainConfig(), args.overrides)
    if args.max_steps is not None:
        tc = dataclasses.replace(tc, max_steps=args.max_steps)
    return config, tc, dc
