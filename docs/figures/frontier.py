"""The size / accuracy / speed frontier (docs/smaller-models.md): `gptjax bench --study frontier`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from figures.common import Results, Row, block, log_axis, of_kind, plot, si
from figures.formats import num, pct, ratio, table
from figures.suite import MODES

FRONTIER = "frontier-cpu.jsonl"  # `gptjax bench --study frontier`: the committed run (docs/smaller-models.md)

FRONTIER_BIG = "frontier-cpu-big-teacher.jsonl"  # an hour-long run whose large teacher got too few steps

def _frontier(results: Results, entry: str, name: str = FRONTIER) -> list[Row]:
    return [r for r in results[name] if r.get("entry") == entry]


def _fp32(results: Results, role: str, shape: str | None = None, tokenizer: str = "byte") -> Row:
    return next(r for r in _frontier(results, "model") if r["precision"] == "fp32" and r["role"] == role
                and (shape is None or r["shape"] == shape) and r["tokenizer"] == tokenizer)


def _all(plain: list[Row], dist: list[Row], key: str, lower: str, higher: str) -> str:
    """How the distilled rows compare with the plain ones on key: lower, higher, or either by shape."""
    signs = {d[key] < p[key] for p, d in zip(plain, dist)}
    return f"{lower} or {higher} by shape" if len(signs) > 1 else (lower if signs.pop() else higher)


def _beaten(teacher: Row, plain: list[Row]) -> str:
    """'.', or which students trained alone scored better than the teacher."""
    won = [p["shape"] for p in plain if p["heldout_bpb"] < teacher["heldout_bpb"]]
    return f"; {' and '.join(won)} trained alone beat the teacher." if won else "."


@block("frontier-findings")
def frontier_findings(results: Results) -> str:
    """The run's findings as sentences, every number from the results (fp32 rows)."""
    teacher = _fp32(results, "teacher")
    goals = [g for g in _goals(results) if g["role"] == "distilled"]
    plain = [_fp32(results, "plain", g["shape"]) for g in goals]
    dist = [_fp32(results, "distilled", g["shape"]) for g in goals]
    first = goals[0]["shape"]
    init = _fp32(results, "distilled+init", first)
    bpe = next(r for r in _frontier(results, "model") if r["precision"] == "fp32" and r["tokenizer"] != "byte")
    byte = _fp32(results, "plain", first)
    pairs = "; ".join(f"{p['shape']}: {p['train_steps']:,} steps alone, {d['train_steps']:,} distilled, "
                      f"{p['heldout_bpb']:.3f} vs {d['heldout_bpb']:.3f} bits/byte, top-1 agreement "
                      f"{pct(p['top1_agreement'])} vs {pct(d['top1_agreement'])}" for p, d in zip(plain, dist))
    better = all(p["heldout_bpb"] < teacher["heldout_bpb"] for p in plain)
    return "\n".join([
        (f"- The teacher scored {teacher['heldout_bpb']:.3f} bits/byte held out; the students trained alone scored "
         f"{min(p['heldout_bpb'] for p in plain):.3f} to {max(p['heldout_bpb'] for p in plain):.3f}"
         + (": every one of them beat the teacher." if better else _beaten(teacher, plain))),
        (f"- At equal time the distilled students took {_all(plain, dist, 'train_steps', 'fewer', 'more')} steps, "
         f"scored {_all(plain, dist, 'heldout_bpb', 'better', 'worse')} and agreed "
         f"{_all(plain, dist, 'top1_agreement', 'less', 'more')} with the teacher ({pairs})."),
        (f"- Starting the {first} student from the teacher's layers: {init['heldout_bpb']:.3f} bits/byte "
         f"({init['train_steps']:,} steps), against {dist[0]['heldout_bpb']:.3f} distilled from scratch."),
        (f"- The same {first} body with the {bpe['tokenizer']} vocabulary ({bpe['bytes_per_token']:.1f} bytes per "
         f"token) scored {bpe['heldout_bpb']:.3f} bits/byte against {byte['heldout_bpb']:.3f} with bytes, and "
         f"decoded {num(bpe['decode_b1_bytes_per_s'], 0)} bytes/s at B=1 against "
         f"{num(byte['decode_b1_bytes_per_s'], 0)}."),
        (f"- The largest B=1 decode speed-up of a distilled student over the teacher (fp32) was "
         f"{ratio(max(g['speedup_b1'] for g in goals))}.")])


@block("frontier-big-teacher")
def frontier_big_teacher(results: Results) -> str:
    """What the run with a large teacher, trained within its budget, got (fp32 rows)."""
    rows = [r for r in _frontier(results, "model", FRONTIER_BIG) if r["precision"] == "fp32"]
    teacher = rows[0]
    best = min(rows[1:], key=lambda r: r["heldout_bpb"])
    args = of_kind(results[FRONTIER_BIG], "environment")["args"]
    verdict = "worse than" if teacher["heldout_bpb"] > best["heldout_bpb"] else "better than"
    return (f"its {teacher['shape']} teacher got {teacher['train_steps']} steps in "
            f"{args['budget'] * args['teacher_factor']:.0f} s and scored {teacher['heldout_bpb']:.2f} bits/byte held "
            f"out, {verdict} a {best['shape']} {best['role']} student trained for {args['budget']:.0f} s "
            f"({best['train_steps']} steps, {best['heldout_bpb']:.2f})")


def _frontier_name(r: Row) -> str:
    return f"{r['shape']} {r['role']}" + ("" if r["tokenizer"] == "byte" else f" ({r['tokenizer']})")


@block("frontier-run")
def frontier_run(results: Results) -> str:
    """How the frontier study ran: commit, budget, and how loaded the machine was."""
    env_row = of_kind(results[FRONTIER], "environment")
    env, rows = env_row["env"], _frontier(results, "model")
    loads = [r["load_avg_1m_measured"] for r in rows] + [r["train_load_avg_1m"] for r in rows]
    args = env_row["args"]
    loads = [x for x in loads if x is not None]
    teacher = (f"the teacher {Path(args['teacher_checkpoint']).name} trained beforehand" if args["teacher_checkpoint"]
               else f"{args['budget'] * args['teacher_factor']:.0f} s for the teacher")
    return (f"git {env['git']}, jax {env['jax']}, {env['cpu']} with {env['cores']} cores; {args['budget']:.0f} s of "
            f"training per student, {teacher}; the whole study took {rows[0]['study_wall_s'] / 60:.0f} min; "
            f"1-minute load average {min(loads):.1f} to {max(loads):.1f} on {env['cores']} cores")


@block("frontier-table")
def frontier_table(results: Results) -> str:
    """Every model x precision mode: size, held-out bits/byte, agreement with the teacher, decode speed."""
    body = [[_frontier_name(r), r["precision"], num(r["weight_bytes"] / 1024, 0), f"{r['heldout_bpb']:.3f}",
             pct(r["top1_agreement"]), num(r["decode_b1_bytes_per_s"], 0), num(r["decode_b8_bytes_per_s"], 0),
             str(r["train_steps"] or "-")] for r in _frontier(results, "model")]
    return table(["model (L x D x H)", "mode", "weights KiB", "held-out bits/byte", "top-1 agreement",
                  "B=1 bytes/s", "B=8 bytes/s", "train steps"], body)


@block("frontier-goal")
def frontier_goal(results: Results) -> str:
    """Per student shape (fp32): bits/byte of teacher, student alone and distilled; gap closed; B=1 speed-up."""
    body = [[f"{g['shape']} {g['role']}", f"{g['teacher_bpb']:.3f}", f"{g['plain_bpb']:.3f}",
             f"{g['distilled_bpb']:.3f}", "-" if g["gap_closed"] is None else pct(g["gap_closed"]),
             ratio(g["speedup_b1"]), "yes" if g["meets_goal"] else "no"] for g in _goals(results)]
    return table(["student", "teacher bits/byte", "alone", "distilled", "gap closed", "B=1 speed-up over teacher",
                  "goal met (>= 3x, > 50%)"], body)


def _goals(results: Results) -> list[Row]:
    """The study's goal rows, recomputed from the model rows (so every way of distilling is counted)."""
    import gptjax.bench.studies.frontier as study

    args = of_kind(results[FRONTIER], "environment")["args"]
    return study.goals(_frontier(results, "model"), args["ladder"].split(","))


def non_dominated(points: list[tuple[float, ...]]) -> list[bool]:
    """True where no other point is at least as good in every coordinate (all minimised) and better in one."""
    return [not any(all(b <= a for a, b in zip(p, q)) and q != p for q in points) for p in points]


@plot("frontier", files=(FRONTIER,), alt="held-out bits per byte against size and decode speed, Pareto points marked",
      uses=(non_dominated, log_axis, si))
def plot_frontier(results: Results) -> Any:
    """Held-out bits/byte against weight bytes (left) and B=1 decode bytes/s (right) for every model x mode;
    the Pareto points (no other model is at once smaller, faster and better) ringed and joined, left to right:
    colour = how it was trained, marker = precision mode, hollow = BPE vocabulary."""
    import matplotlib.pyplot as plt

    rows = _frontier(results, "model")
    # bits/byte to the table's 3 decimals: int8 and w8a8 of one model differ by 1e-4, noise, not a trade-off
    best = non_dominated([(r["weight_bytes"], -r["decode_b1_bytes_per_s"], round(r["heldout_bpb"], 3)) for r in rows])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    colours = {"teacher": "k", "plain": "C0", "distilled": "C3", "distilled+init": "C1"}
    markers = dict(zip(MODES, ("o", "s", "^", "v")))
    for ax, key, label in ((axes[0], "weight_bytes", "weight bytes (lower is smaller)"),
                           (axes[1], "decode_b1_bytes_per_s", "greedy decode bytes/s at B=1 (higher is faster)")):
        for r in rows:
            face = colours[r["role"]] if r["tokenizer"] == "byte" else "none"
            ax.scatter(r[key], r["heldout_bpb"], color=face, edgecolors=colours[r["role"]],
                       marker=markers[r["precision"]], s=40, zorder=3)
        front = sorted((r[key], r["heldout_bpb"], r) for r, keep in zip(rows, best) if keep)
        ax.plot([p[0] for p in front], [p[1] for p in front], color="grey", ls="--", lw=1.2, zorder=2,
                label="Pareto points (size, speed, bits/byte)")
        ax.scatter([p[0] for p in front], [p[1] for p in front], s=220, facecolors="none", edgecolors="grey", zorder=2)
        for i, (x, y, r) in enumerate(front):  # labels alternate below and above, off the points
            ax.annotate(f"{r['shape']}{'' if r['tokenizer'] == 'byte' else ' ' + r['tokenizer']} {r['precision']}",
                        (x, y), fontsize=8, xytext=(-10, -16 if i % 2 == 0 else 10), textcoords="offset points")
        log_axis(ax, "x")
        ax.set(xlabel=label)
    for role, colour in colours.items():
        axes[1].scatter([], [], color=colour, marker="o", label=role)
    for mode, marker in markers.items():
        axes[1].scatter([], [], color="none", edgecolors="grey", marker=marker, label=mode)
    axes[0].set(ylabel="held-out bits per byte (lower is better)")
    fig.suptitle("size / accuracy / speed on a 2-core CPU (hollow: BPE vocabulary)", fontsize=11)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig
