"""The size / accuracy / speed frontier of smaller models, and what knowledge distillation buys.

    gptjax bench --study frontier --budget 60             # 60 s of training per student, 3x that for the teacher
    gptjax bench --study frontier --budget 600 --teacher 6x384x6 --ladder 3x384x6,6x192x6,3x192x3,2x128x2

Trains a teacher (L x D x H, byte-level) on --data for --teacher-factor x --budget seconds (or takes a trained
one, --teacher-checkpoint), then every shape of
--ladder twice for --budget seconds each: plainly (cross-entropy) and distilled from the teacher (gptjax.distill,
--alpha, --temperature): equal training *time*, so the distilled student, whose steps also run the teacher's
forward pass, takes fewer steps (the clock starts after the first, compiling step). The first ladder shape is also distilled starting from the teacher's layers
when it has the teacher's width (--init-from-teacher), and trained plainly with each tokenizer of --vocab (a
BPE vocabulary instead of bytes; not distilled: the vocabulary must match the teacher's). Learning rate: warm-up,
then constant (a run stopped by time ends at the same rate whichever model it is).

Then, for every model and every precision mode of --precisions: held-out bits per byte on text outside the
training corpus (--heldout: by default the Python source of an installed package, tqdm, which the stdlib corpus
does not contain), top-1 agreement with the fp32 teacher on the same windows (byte models), weight bytes
(gptjax.precision's formula) and greedy decode tokens/s at B=1 and B=8 (--prompt + --new tokens, the whole
generate call timed, median of --runs after a compiling warm-up; bytes/s too, which compares tokenizers). The
rows end with the goal per ladder shape: decode speed at B=1 over the teacher's, and the fraction of the
teacher-to-student(alone) bits/byte gap that distillation closed.

--sweep varies the seed's three size knobs one at a time around --base, each model trained plainly for --budget
(the same training time) and measured like the others: `--sweep "vocab=char:64,byte,bpe:1024 layers=1,2,4,6
width=64,128,256,384"` (knobs space-separated; width w has w/64 heads, at least one). The base point is trained
once and shared by every sweep; its rows and each sweep point's carry `knobs` (the sweeps it belongs to) and
`levers` ({"vocab", "layers", "width"}), so each knob's table reads params, bytes, speed and bits/byte alone.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from gptjax import precision as registry
from gptjax.backends import get_backend
from gptjax.bench.ceilings import matmul_flops
from gptjax.bench.report import write_jsonl
from gptjax.bench.results import Outcome
from gptjax.config import GPTConfig
from gptjax.data import bits_per_byte, eval_batches
from gptjax.errors import GptjaxError
from gptjax.sampling import GREEDY
from gptjax.timing import clock, interleaved_times, load_average, median, timed_value
from gptjax.tokenizer import checkpoint_tokenizer
from gptjax.weights import load_checkpoint, load_config

# flag -> (default, help); the runner adds them (the type is the default's)
FLAGS = {"--budget": (60.0, "training seconds per student run"),
         "--teacher-factor": (3.0, "the teacher trains this many times --budget"),
         "--teacher": ("4x256x4", "teacher shape, layers x width x heads (byte-level)"),
         "--teacher-checkpoint": ("", "a trained byte-level teacher to use instead of training one"),
         "--ladder": ("2x256x4,4x128x4,2x128x2,1x64x1", "comma list of student shapes L x D x H"),
         "--vocab": ("bpe:1024", "tokenizers (comma list) the first ladder shape also trains with, plainly"),
         "--context": (128, "context and training window"),
         "--batch": (16, "training batch"),
         "--lr": (3e-3, "learning rate after warm-up"),
         "--alpha": (0.5, "distillation: weight of the soft term"),
         "--temperature": (2.0, "distillation: softmax temperature"),
         "--data": ("stdlib", "training corpus (gptjax train --data)"),
         "--heldout": ("", "file, directory or glob of held-out text (default: tqdm's installed source)"),
         "--heldout-bytes": (32768, "held-out bytes scored"),
         "--precisions": (",".join(registry.MODES), "comma list of precision modes measured"),
         "--prompt": (16, "decode prompt tokens"), "--new": (32, "decode new tokens per row"),
         "--runs": (3, "timed decode runs per batch size, median reported"),
         "--base": ("4x256x4", "the sweeps' base shape L x D x H (byte-level, trained once for every sweep)"),
         "--sweep": ("", ("size knobs varied alone around --base at --budget each, space-separated KNOB=V1,V2,...: "
                          "vocab=char:64,byte,bpe:1024 layers=1,2,4 width=64,128,256"))}
SWEEP_KNOBS = ("vocab", "layers", "width")

BATCHES = (1, 8)


def parse_shape(text: str) -> tuple[int, int, int]:
    """'4x256x4' -> (4, 256, 4); a GptjaxError for anything else."""
    try:
        L, D, H = (int(v) for v in text.split("x"))
    except ValueError:
        raise GptjaxError(f"shape {text!r}: give layers x width x heads, e.g. 4x256x4") from None
    if min(L, D, H) < 1 or D % H:
        raise GptjaxError(f"shape {text!r}: positive sizes with the width divisible by the heads")
    return L, D, H


def prepare(args: argparse.Namespace) -> None:
    """Check every flag before anything trains."""
    for text in [args.teacher, *args.ladder.split(",")]:
        parse_shape(text)
    for p in args.precisions.split(","):
        registry.mode(p)
    if args.teacher_checkpoint:
        teacher = load_config(args.teacher_checkpoint)
        if teacher.vocab_size != 256 or teacher.n_positions < args.context:
            raise GptjaxError(f"--teacher-checkpoint {args.teacher_checkpoint}: needs a byte-level model "
                              f"(vocab_size 256) with a context of at least --context {args.context}")
    if args.budget <= 0 or args.teacher_factor <= 0 or min(args.context, args.batch, args.heldout_bytes, args.prompt,
                                                            args.new, args.runs) < 1:
        raise GptjaxError("--budget, --teacher-factor, --context, --batch, --heldout-bytes, --prompt, --new and "
                          "--runs must be positive")
    if args.prompt + args.new > args.context:
        raise GptjaxError(f"--prompt {args.prompt} + --new {args.new} must fit --context {args.context}")
    heldout_files(args.heldout)
    sweep_points(args.base, parse_sweeps(args.sweep))


def parse_sweeps(text: str) -> dict[str, list[str]]:
    """'vocab=byte,bpe:512 layers=1,2' -> {"vocab": ["byte", "bpe:512"], "layers": ["1", "2"]}; a GptjaxError
    naming a bad knob or value."""
    sweeps = {}
    for item in text.split():
        knob, _, values = item.partition("=")
        if knob not in SWEEP_KNOBS or not values:
            raise GptjaxError(f"--sweep {item!r}: give KNOB=V1,V2,... with KNOB one of {', '.join(SWEEP_KNOBS)}")
        sweeps[knob] = values.split(",")
    for v in sweeps.get("vocab", []):
        if v != "byte" and not v.startswith(("bpe:", "char:")):
            raise GptjaxError(f"--sweep vocab value {v!r}: byte, bpe:N or char:N")
    for knob in ("layers", "width"):
        if not all(v.isdigit() and int(v) > 0 for v in sweeps.get(knob, [])):
            raise GptjaxError(f"--sweep {knob}={','.join(sweeps[knob])}: positive integers")
    return sweeps


def sweep_points(base: str, sweeps: dict[str, list[str]]) -> dict[tuple[str, str], list[str]]:
    """(shape, tokenizer) -> the knobs whose sweep holds that point: the base point (base, byte) once, in every
    sweep given; a width w gets w/64 heads (at least one)."""
    L, D, H = parse_shape(base)
    points: dict[tuple[str, str], list[str]] = {}
    for knob, values in sweeps.items():
        for v in values:
            width = int(v) if knob == "width" else D
            shape = (f"{v}x{D}x{H}" if knob == "layers" else f"{L}x{width}x{max(1, width // 64)}" if knob == "width"
                     else base)
            parse_shape(shape)
            points.setdefault((shape, v if knob == "vocab" else "byte"), []).append(knob)
    if sweeps:
        points.setdefault((base, "byte"), [])
        points[(base, "byte")] = list(dict.fromkeys(points[(base, "byte")] + list(sweeps)))
    return points


def heldout_files(spec: str) -> list[Path]:
    """The held-out text files: spec's, else tqdm's installed source (not in the stdlib training corpus)."""
    if not spec:
        found = importlib.util.find_spec("tqdm")
        if found is None or not found.submodule_search_locations:
            raise GptjaxError("no --heldout given and tqdm is not installed: give --heldout FILES")
        spec = os.path.join(next(iter(found.submodule_search_locations)), "*.py")
    paths = [Path(spec)] if os.path.isfile(spec) else sorted(Path(p) for p in glob.glob(
        os.path.join(spec, "**", "*.py") if os.path.isdir(spec) else spec, recursive=True) if os.path.isfile(p))
    if not paths:
        raise GptjaxError(f"--heldout {spec!r} names no files")
    return paths


def heldout_text(paths: list[Path], n_bytes: int) -> str:
    """The first n_bytes of the files' text, joined as training joins documents (whole characters)."""
    text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in paths)
    return text.encode("utf-8")[:n_bytes].decode("utf-8", errors="ignore")


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """For (speed, loss) points: True where no other point is at least as fast and as accurate and better in one."""
    return [not any(s2 >= s and l2 <= l and (s2 > s or l2 < l) for s2, l2 in points) for s, l in points]


# ---- training ------------------------------------------------------------------------------------------------
def _config(shape: str, context: int) -> GPTConfig:
    L, D, H = parse_shape(shape)
    return GPTConfig(vocab_size=256, n_positions=context, n_layer=L, n_head=H, n_embd=D)


def _train_config(args: argparse.Namespace, tokenizer: str = "byte") -> Any:
    from gptjax.train import TrainConfig  # jax, flax, optax (seconds): not for the study's --help and flag checks

    # stopped by time: max_steps only bounds the run; the schedule is warm-up then constant (min_lr = lr)
    return TrainConfig(batch_size=args.batch, seq_len=args.context, max_steps=10**6, warmup_steps=20, lr=args.lr,
                       min_lr=args.lr, eval_every=10**6, checkpoint_every=10**6, keep_checkpoints=1, log_every=50,
                       tokenizer=tokenizer)


def _train_all(args: argparse.Namespace, root: Path, log: Any) -> list[dict[str, Any]]:
    """Train the teacher and every student; one dict per model (name, role, shape, tokenizer, where, how long)."""
    # jax, flax, optax (seconds): not for the study's --help and flag checks
    from gptjax.distill import DistillConfig, distill
    from gptjax.train import TrainOptions, train

    peak = matmul_flops("fp32", 1024)  # the MFU denominator, measured once rather than per run
    data = None if args.data == "stdlib" else args.data

    def options(seconds: float) -> Any:
        return TrainOptions(data_spec=data, max_time=seconds, progress=False, peak_flops=peak,
                            max_time_after_compile=True)

    def run(name: str, role: str, shape: str, tokenizer: str, seconds: float, fn: Any, *fn_args: Any
            ) -> dict[str, Any]:
        log(f"frontier: training {name} ({role}, {shape}, {tokenizer}) for {seconds:.0f} s ...")
        load = load_average()
        result, wall = timed_value(lambda: fn(*fn_args, root / name, options(seconds)))
        return {"model": name, "role": role, "shape": shape, "tokenizer": tokenizer, "dir": str(root / name / "model"),
                "train_budget_s": seconds, "train_wall_s": wall, "train_steps": result.steps,
                "train_val_bpb": result.val_bpb, "train_load_avg_1m": load}

    if args.teacher_checkpoint:
        models = [_given_teacher(args.teacher_checkpoint)]
        t_config = load_config(args.teacher_checkpoint)
    else:
        t_config = _config(args.teacher, args.context)
        models = [run("teacher", "teacher", args.teacher, "byte", args.budget * args.teacher_factor, train, t_config,
                      _train_config(args))]
    teacher_dir = models[0]["dir"]
    for i, shape in enumerate(args.ladder.split(",")):
        config = _config(shape, args.context)
        models.append(run(f"plain-{shape}", "plain", shape, "byte", args.budget, train, config, _train_config(args)))
        dc = DistillConfig(teacher_dir, args.alpha, args.temperature)
        models.append(run(f"distilled-{shape}", "distilled", shape, "byte", args.budget, distill, config,
                          _train_config(args), dc))
        if i == 0 and config.n_embd == t_config.n_embd and config.n_layer <= t_config.n_layer:
            cut = DistillConfig(teacher_dir, args.alpha, args.temperature, init_from_teacher=True)
            models.append(run(f"distilled-init-{shape}", "distilled+init", shape, "byte", args.budget, distill,
                              config, _train_config(args), cut))
        for tok in (t for t in args.vocab.split(",") if i == 0 and t and t != "none"):
            models.append(run(f"plain-{shape}-{tok.replace(':', '')}", "plain", shape, tok, args.budget, train,
                              config, _train_config(args, tok)))
    for (shape, tok), knobs in sweep_points(args.base, parse_sweeps(args.sweep)).items():
        L, D, _ = parse_shape(shape)
        levers = {"knobs": knobs, "levers": {"vocab": tok, "layers": L, "width": D}}
        same = next((m for m in models if (m["role"], m["shape"], m["tokenizer"]) == ("plain", shape, tok)), None)
        if same is not None:  # a ladder model at the same budget is this point already
            same |= levers
            continue
        models.append(run(f"sweep-{shape}-{tok.replace(':', '')}", "plain", shape, tok, args.budget, train,
                          _config(shape, args.context), _train_config(args, tok)) | levers)
    return models


def _given_teacher(path: str) -> dict[str, Any]:
    """The model entry of a teacher trained elsewhere (--teacher-checkpoint)."""
    config = load_config(path)
    return {"model": "teacher", "role": "teacher", "shape": f"{config.n_layer}x{config.n_embd}x{config.n_head}",
            "tokenizer": "byte", "dir": os.path.abspath(path), "train_budget_s": None, "train_wall_s": None,
            "train_steps": None, "train_val_bpb": None, "train_load_avg_1m": None}


# ---- measuring -----------------------------------------------------------------------------------------------
def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _scores(backend: Any, weights: Any, tokens: np.ndarray, context: int) -> tuple[float, np.ndarray]:
    """(mean next-token loss in nats, argmax ids [N]) over tokens tiled in windows of context (eval_batches)."""
    losses, top = [], []
    for x, y in eval_batches(tokens, 8, context):
        logp = _log_softmax(backend.forward(weights, x).astype(np.float64))  # [B, T, V]
        losses.append(-np.take_along_axis(logp, y[..., None], -1)[..., 0].ravel())
        top.append(logp.argmax(-1).ravel())
    return float(np.concatenate(losses).mean()), np.concatenate(top)


def _generate(backend: Any, weights: Any, prompts: list[list[int]], new: int) -> Any:
    """A timed call: greedy generation of `new` tokens for each prompt (fresh closure per model and batch)."""
    return lambda i: backend.generate(weights, prompts, new, sampling=GREEDY)


def _load(model: dict[str, Any], text: str) -> tuple[Any, Any, np.ndarray, dict[str, Any]]:
    """(config, params, held-out tokens in the model's tokenizer, the model's row fields)."""
    config, params = load_checkpoint(model["dir"])
    tokens = np.asarray(checkpoint_tokenizer(model["dir"], config.vocab_size).encode(text), np.int64)
    n_bytes = len(text.encode("utf-8"))
    return config, params, tokens, model | {"vocab": config.vocab_size, "params": config.num_params(),
                                            "heldout_bytes": n_bytes, "heldout_tokens": len(tokens),
                                            "bytes_per_token": n_bytes / len(tokens)}


def _measure(models: list[dict[str, Any]], text: str, reference: np.ndarray, mode: str, args: argparse.Namespace,
             log: Any) -> list[dict[str, Any]]:
    """One row per model in one precision mode: held-out scores, then every model's decode timed in turn
    (A B C ... A B C: the machine's drift hits all models alike)."""
    rows, calls = [], {}
    for model in models:
        log(f"frontier: measuring {model['model']} {mode} ...")
        config, params, tokens, base = _load(model, text)
        backend = get_backend("jax", config, precision=mode)
        weights = backend.prepare(params)
        loss, top = _scores(backend, weights, tokens, args.context)
        agree = float((top == reference).mean()) if config.vocab_size == 256 else None  # byte models only
        rows.append(base | {"entry": "model", "precision": mode, "weight_bytes": registry.weight_bytes(config, mode),
                            "heldout_loss": loss, "heldout_bpb": bits_per_byte(loss, len(tokens), base["heldout_bytes"]),
                            "top1_agreement": agree})
        for B in BATCHES:  # prompts: the first B held-out windows of --prompt tokens
            prompts = [tokens[i * args.prompt:(i + 1) * args.prompt].tolist() for i in range(B)]
            calls[(model["model"], B)] = _generate(backend, weights, prompts, args.new)
    log(f"frontier: timing decode of {len(models)} models in {mode} ...")
    times = interleaved_times({f"{name} B{B}": fn for (name, B), fn in calls.items()}, args.runs, warmup=1)
    for row in rows:
        row["decode_times_s"] = {f"b{B}": times[f"{row['model']} B{B}"] for B in BATCHES}
        for B in BATCHES:
            row[f"decode_b{B}_tokens_per_s"] = B * args.new / median(row["decode_times_s"][f"b{B}"])
            row[f"decode_b{B}_bytes_per_s"] = row[f"decode_b{B}_tokens_per_s"] * row["bytes_per_token"]
        row["load_avg_1m_measured"] = load_average()
    return rows


def _teacher_reference(teacher: dict[str, Any], text: str, context: int) -> np.ndarray:
    """The fp32 teacher's argmax on the held-out windows (what agreement is measured against)."""
    config, params = load_checkpoint(teacher["dir"])
    backend = get_backend("jax", config)
    tokens = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64)
    return _scores(backend, backend.prepare(params), tokens, context)[1]


def goals(rows: list[dict[str, Any]], ladder: list[str]) -> list[dict[str, Any]]:
    """Per ladder shape and way of distilling, in fp32: the distilled student's B=1 decode speed over the
    teacher's, and the fraction of the teacher-to-plain bits/byte gap it closed (the goal: >= 3x, > 0.5)."""
    fp32 = {(r["role"], r["shape"], r["tokenizer"]): r for r in rows if r.get("entry") == "model"
            and r["precision"] == "fp32"}
    teacher = next(r for (role, _, _), r in fp32.items() if role == "teacher")
    out = []
    for shape in ladder:
        for role in ("distilled", "distilled+init"):
            plain, dist = fp32.get(("plain", shape, "byte")), fp32.get((role, shape, "byte"))
            if plain is None or dist is None:
                continue
            gap = plain["heldout_bpb"] - teacher["heldout_bpb"]
            closed = (plain["heldout_bpb"] - dist["heldout_bpb"]) / gap if gap > 0 else None
            speed = dist["decode_b1_tokens_per_s"] / teacher["decode_b1_tokens_per_s"]
            out.append({"entry": "goal", "shape": shape, "role": role, "teacher_bpb": teacher["heldout_bpb"],
                        "plain_bpb": plain["heldout_bpb"], "distilled_bpb": dist["heldout_bpb"],
                        "gap_closed": closed, "speedup_b1": speed,
                        "meets_goal": bool(speed >= 3 and closed is not None and closed > 0.5)})
    return out


def run(args: argparse.Namespace, log: Any) -> Outcome:
    """Train every model, measure every model x precision mode, and the goal rows."""
    root = Path(args.out) / "runs"
    files = heldout_files(args.heldout)
    text = heldout_text(files, args.heldout_bytes)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    t0 = clock()
    models = _train_all(args, root, log)
    reference = _teacher_reference(models[0], text, args.context)
    rows = []
    for mode in args.precisions.split(","):
        rows += _measure(models, text, reference, mode, args, log)
        write_jsonl(str(root / "measured.jsonl"), rows[-len(models):])  # kept should a later mode fail
    order = [m["model"] for m in models]
    rows.sort(key=lambda r: order.index(r["model"]))  # model by model, modes in --precisions order
    rows += goals(rows, args.ladder.split(","))
    note = {"heldout_files": [f.name for f in files], "heldout_sha256_16": digest,
            "study_wall_s": clock() - t0}
    rows = [note | r for r in rows]
    return Outcome(rows, f"gptjax bench --study frontier: {args.budget:.0f} s per student, teacher "
                   f"{args.teacher} x{args.teacher_factor:g}", table(rows))


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown tables: every model x mode, then the goal per ladder shape."""
    header = ("| model | role | tokenizer | mode | weights KiB | held-out bits/byte | top-1 agreement | B=1 tok/s | "
              "B=8 tok/s | B=1 bytes/s | train steps |")
    lines = [header, "|" + "---|" * 11]
    for r in (r for r in rows if r["entry"] == "model"):
        agree = "-" if r["top1_agreement"] is None else f"{100 * r['top1_agreement']:.1f}%"
        lines.append(f"| {r['shape']} | {r['role']} | {r['tokenizer']} | {r['precision']} | "
                     f"{r['weight_bytes'] / 1024:,.0f} | {r['heldout_bpb']:.3f} | {agree} | "
                     f"{r['decode_b1_tokens_per_s']:,.0f} | {r['decode_b8_tokens_per_s']:,.0f} | "
                     f"{r['decode_b1_bytes_per_s']:,.0f} | {r['train_steps'] or '-'} |")
    lines += ["", "| student | teacher bits/byte | alone | distilled | gap closed | B=1 speed-up | goal met |",
              "|---|---|---|---|---|---|---|"]
    for g in (r for r in rows if r["entry"] == "goal"):
        closed = "-" if g["gap_closed"] is None else f"{100 * g['gap_closed']:.0f}%"
        lines.append(f"| {g['shape']} {g['role']} | {g['teacher_bpb']:.3f} | {g['plain_bpb']:.3f} | {g['distilled_bpb']:.3f} | "
                     f"{closed} | {g['speedup_b1']:.2f}x | {'yes' if g['meets_goal'] else 'no'} |")
    return "\n".join(lines + lever_tables(rows))


def lever_tables(rows: list[dict[str, Any]]) -> list[str]:
    """Per swept knob, its points in fp32 (the base among them): params, weights, bits/byte, speed, steps."""
    lines = []
    for knob in SWEEP_KNOBS:
        points = sorted((r for r in rows if r["entry"] == "model" and r["precision"] == "fp32"
                         and knob in r.get("knobs", ())), key=lambda r: (r["params"], str(r["levers"][knob])))
        if not points:
            continue
        lines += ["", f"| {knob} | params | weights KiB | held-out bits/byte | B=1 bytes/s | B=8 bytes/s "
                      "| train steps |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['levers'][knob]} | {r['params']:,} | {r['weight_bytes'] / 1024:,.0f} "
                  f"| {r['heldout_bpb']:.3f} | {r['decode_b1_bytes_per_s']:,.0f} | {r['decode_b8_bytes_per_s']:,.0f} "
                  f"| {r['train_steps'] or '-'} |" for r in points]
    return lines
