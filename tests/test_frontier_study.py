"""The frontier study's size-knob sweeps: each knob varied alone around --base at the same budget (vocabulary
smaller and larger than bytes, layers, width), the base trained once, rows the docs can table per knob."""

import json
from pathlib import Path

import pytest

from gptjax.errors import GptjaxError

TEACHER = Path(__file__).parent / "fixtures" / "trained_byte_tiny"


def test_sweep_points_share_the_base_and_vary_one_knob_each():
    from gptjax.bench.studies.frontier import parse_sweeps, sweep_points

    sweeps = parse_sweeps("vocab=char:64,byte,bpe:512 layers=1,4 width=64,128,256")
    assert sweeps == {"vocab": ["char:64", "byte", "bpe:512"], "layers": ["1", "4"], "width": ["64", "128", "256"]}
    assert sweep_points("4x256x4", sweeps) == {
        ("4x256x4", "char:64"): ["vocab"], ("4x256x4", "byte"): ["vocab", "layers", "width"],
        ("4x256x4", "bpe:512"): ["vocab"], ("1x256x4", "byte"): ["layers"], ("4x64x1", "byte"): ["width"],
        ("4x128x2", "byte"): ["width"]}
    assert sweep_points("2x32x2", parse_sweeps("layers=1")) == {("1x32x2", "byte"): ["layers"],
                                                                ("2x32x2", "byte"): ["layers"]}
    assert sweep_points("2x32x2", {}) == {}
    for text, needle in (("depth=1,2", "KNOB one of vocab, layers, width"), ("vocab=words", "byte, bpe:N or char:N"),
                         ("layers=0", "--sweep layers=0: positive integers"), ("width=", "give KNOB=V1,V2")):
        with pytest.raises(GptjaxError, match=needle):
            parse_sweeps(text)


@pytest.mark.slow  # four training runs of 1 s each, each compiling first: 2-6 min on 2 loaded cores
def test_a_tiny_sweep_writes_each_knobs_table(tmp_path):
    from gptjax.bench.studies import main

    out = tmp_path / "frontier"
    assert main(["frontier", "--teacher-checkpoint", str(TEACHER), "--ladder", "1x32x2", "--vocab", "none",
                 "--budget", "1", "--context", "32", "--batch", "2", "--heldout-bytes", "2048", "--precisions",
                 "fp32", "--prompt", "4", "--new", "4", "--runs", "1", "--base", "1x32x2",
                 "--sweep", "vocab=char:48,byte layers=2 width=64", "--heldout", str(Path(__file__)),
                 "--out", str(out)], log=lambda *a: None) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()[1:]]
    models = {r["model"]: r for r in rows if r.get("entry") == "model"}
    # the ladder's plain 1x32x2 is the base point: reused, not trained again
    assert "sweep-1x32x2-byte" not in models and models["plain-1x32x2"]["knobs"] == ["vocab", "layers", "width"]
    char = models["sweep-1x32x2-char48"]
    assert char["vocab"] == 48 and char["levers"] == {"vocab": "char:48", "layers": 1, "width": 32}
    assert char["knobs"] == ["vocab"] and char["top1_agreement"] is None and char["heldout_bpb"] > 0
    assert models["sweep-2x32x2-byte"]["levers"]["layers"] == 2 and models["sweep-1x64x1-byte"]["params"] > 0
    table = (out / "results.md").read_text()
    for header in ("| vocab | params |", "| layers | params |", "| width | params |"):
        assert header in table
    assert "| char:48 |" in table and "| byte |" in table
