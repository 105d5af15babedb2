"""The scaling study's measurements on 8 host devices (tests/conftest.py): per-device bytes of weights and AdamW
state from the arrays' shards, counted by hand for the tiny preset, and the collectives of the compiled step."""

import json

import pytest

from gptjax import get_preset
from gptjax.bench.studies import main
from gptjax.bench.studies.scaling import COLLECTIVES, collectives

# tiny: L=2, D=32, H=2, F=128, V=256, 64 positions: 35,712 float32 parameters
N = 35_712
COUNTS = 2 * 4  # optax's two int32 step counts (the schedule's, adam's), replicated on every device


@pytest.mark.slow  # four meshes, each compiling the step three times (two warm-ups, the HLO): 4.5 min on 2 loaded cores
def test_per_device_bytes_and_collectives_per_mesh(tmp_path):
    assert get_preset("tiny").num_params() == N
    out = tmp_path / "scaling"
    assert main(["scaling", "--preset", "tiny", "--batch", "8", "--seq-len", "8", "--runs", "1", "--meshes",
                 "1x1x1,8x1x1,1x8x1,1x1x2", "--out", str(out)], log=lambda *a: None) == 0
    rows = {r["mesh"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines()[1:])}
    weights = {mesh: r["weight_bytes"] for mesh, r in rows.items()}
    # fsdp=8 shards every weight along its model width except the two biases without one (qkv 3·D, c_fc F), per
    # layer 96 + 128 = 224 floats kept whole; tensor=2 halves the heads' and MLP's weights and biases and the token
    # table (per layer 1536 + 512 + 48 + 2048 + 64 + 2048 + the width's 32 + 128 + 32; wpe, ln_f whole)
    fsdp = 4 * ((N - 2 * 224) // 8 + 2 * 224)
    tensor = 4 * (2 * (1536 + 512 + 48 + 32 + 128 + 2048 + 64 + 2048 + 32) + 64 + 64 * 32 + 256 * 32 // 2)
    assert weights == {"1x1x1": 4 * N, "8x1x1": 4 * N, "1x8x1": fsdp, "1x1x2": tensor}
    assert fsdp == 19_424 and tensor == 76_416
    assert {mesh: r["optimizer_bytes"] for mesh, r in rows.items()} == {m: 2 * w + COUNTS for m, w in weights.items()}
    ops = {mesh: {op: v["count"] for op, v in r["collectives"].items() if v["count"]} for mesh, r in rows.items()}
    assert ops["1x1x1"] == {}  # one device: nothing to communicate
    assert ops["8x1x1"].get("all-reduce", 0) > 0  # data parallel: the gradients are all-reduced
    assert ops["1x8x1"].get("all-gather", 0) > 0  # FSDP gathers the sharded weights
    assert all(r["collectives"][op]["bytes"] > 0 for r in rows.values() for op, n in ops[r["mesh"]].items())
    assert rows["8x1x1"]["weight_bytes_estimate"] == 4 * N and rows["1x1x1"]["step_s"] > 0
    assert "| 1x1x1 |" in (out / "results.md").read_text() and "| none |" in (out / "results.md").read_text()


def test_collectives_are_counted_by_kind_from_hlo_text():
    hlo = """
  %all-reduce.1 = f32[8,16]{1,0} all-reduce(%a), channel_id=1, to_apply=%add
  %ars = (f32[], bf16[4]{0}) all-reduce-start(%b, %c), channel_id=2
  %ard = (f32[], bf16[4]{0}) all-reduce-done(%ars)
  %all-gather.2 = f32[8,16,96]{2,1,0} all-gather(%d), dimensions={0}
  %cp = s8[10]{0} collective-permute(%e), source_target_pairs={{0,1}}
  %add.3 = f32[8] add(%x, %y), metadata={op_name="jit(step)/mul"}
"""
    got = collectives(hlo)
    assert list(got) == list(COLLECTIVES)
    assert got["all-reduce"] == {"count": 2, "bytes": 4 * 128 + 4 + 2 * 4}
    assert got["all-gather"] == {"count": 1, "bytes": 4 * 8 * 16 * 96}
    assert got["collective-permute"] == {"count": 1, "bytes": 10}
    assert got["reduce-scatter"] == got["all-to-all"] == {"count": 0, "bytes": 0}


def test_a_mesh_the_model_cannot_split_is_skipped_with_the_reason(tmp_path):
    out = tmp_path / "scaling"
    assert main(["scaling", "--preset", "tiny", "--batch", "8", "--seq-len", "8", "--runs", "1", "--meshes", "1x1x8",
                 "--out", str(out)], log=lambda *a: None) == 0
    [row] = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()[1:]]
    assert row["status"] == "skipped" and row["message"] == "n_head=2 is not divisible by the mesh's tensor size 8"
