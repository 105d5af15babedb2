"""The peers of `gptjax bench --peer`: llama.cpp, CTranslate2 and ONNX Runtime in processes of their own on the
run's weights, each variant checked before it is timed, cells round-robin with the order rotated. Needs the
peers extra: skipped without it, except under CI, which installs it (a missing one fails)."""

from __future__ import annotations

import importlib
import os
import sys

import numpy as np
import pytest

from gptjax.bench import peers
from gptjax.bench.peers.process import check_logits
from gptjax.bench.report import read_jsonl
from gptjax.cli import main
from gptjax.errors import GptjaxError
from gptjax.timing import interleaved_runs

SMALL = ["--preset", "tiny", "--no-plots", "--matmul-n", "32", "--bandwidth-mib", "1", "--runs", "2"]


def need(module: str):
    """The module, or a skip where the peers extra is not installed (a failure under CI, which installs it)."""
    return importlib.import_module(module) if os.environ.get("CI") else pytest.importorskip(module)


def test_peer_names_and_the_mode_mapping():
    assert peers.parse_peers("llama.cpp, ct2,ort,llama.cpp") == ("llama.cpp", "ct2", "ort")
    assert peers.parse_peers("none") == () and peers.parse_peers(None) == ()
    with pytest.raises(GptjaxError, match="--peer 'vllm'; allowed: a comma list of llama.cpp, ct2, ort, hf"):
        peers.parse_peers("ct2,vllm")
    assert [peers.width(m) for m in ("fp32", "bf16", "int8", "w8a8", "fp8", "int4")] == [32, 16, 8, 8, 8, 4]
    assert peers.variants("llama.cpp", "int4") == ("q4_0", "q4_K_M")
    assert peers.variants("llama.cpp", "bf16") == ("f16", "bf16")
    assert peers.variants("ct2", "w8a8") == ("int8_float32",) and peers.variants("ort", "int4") == ()
    assert all(v in peers.TOLERANCES for table in peers.VARIANTS.values() for vs in table.values() for v in vs)


def test_the_check_passes_within_tolerance_and_fails_beyond():
    ours = np.array([[1.0, 2.0, 3.0], [3.0, 0.0, -1.0]], np.float32)
    good = check_logits("float32", ours + 1e-5, ours)
    assert good["passed"] and good["greedy_agreement"] == 1.0 and good["max_rel_logit_error"] < 1e-4
    flipped = check_logits("q4_0", ours[:, ::-1], ours)
    assert not flipped["passed"] and flipped["greedy_agreement"] == 0.0
    assert "greedy agreement 0% (needed 30%)" in flipped["message"]
    assert not check_logits("f32", ours[:1], ours)["passed"]  # a wrong shape never passes


def test_rotated_rounds_start_one_later_each_time():
    order = []
    fns = {name: (lambda i, name=name: order.append((name, i))) for name in "ABC"}
    interleaved_runs(fns, runs=3, warmup=1, rotate=True)
    assert [n for n, _ in order] == list("ABC" + "ABC" + "BCA" + "CAB")
    assert [i for _, i in order[3:]] == [0] * 3 + [1] * 3 + [2] * 3


def test_a_missing_extra_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ctranslate2" else real(name, *a))
    assert main(["bench", "--peer", "ct2", "--out", str(tmp_path), *SMALL]) == 2
    assert "--peer ct2 needs the `peers` extra (pip install 'gptjax[peers]'): ctranslate2 not installed" in \
        capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.integration
def test_every_peer_runs_checked_and_interleaved(tmp_path):
    for module in ("llama_cpp", "gguf", "ctranslate2", "onnxruntime", "onnx"):
        need(module)
    out = tmp_path / "run"
    assert main(["bench", *SMALL, "--out", str(out), "--precision", "fp32,int8,int4", "--workloads", "prefill,decode",
                 "--batch", "1,2", "--new", "4", "--seq", "16", "--peer", "llama.cpp,ct2,ort"]) == 0
    rows = [r for r in read_jsonl(str(out / "results.jsonl")) if r["kind"] == "workload"]
    cells = {(r["workload"], r["batch"], r["backend"], r["precision"]): r for r in rows}
    expected = {"fp32": {"llama.cpp": ["f32"], "ct2": ["float32"], "ort": ["fp32"]},
                "int8": {"llama.cpp": ["q8_0"], "ct2": ["int8_float32"], "ort": ["int8"]},
                "int4": {"llama.cpp": ["q4_0", "q4_K_M"]}}
    for (workload, batch) in [("prefill", 1), ("decode", 1), ("decode", 2)]:
        for mode, by_peer in expected.items():
            ours = cells[(workload, batch, "jax", mode)]
            assert ours["status"] == "ok" and ours["best_peer"] in ours["vs_peers"]
            for name, variants in by_peer.items():
                for v in variants:
                    r = cells[(workload, batch, name, v)]
                    assert r["status"] == "ok", r
                    assert r["peer"]["check"]["passed"] and r["peer"]["version"] and r["peer"]["threads"] == 2
                    assert r["peer"]["maps"] == f"{mode} -> {v}" and len(r["times_s"]) == 2
                    assert f"{name} {v}" in ours["vs_peers"]
                    assert ("prompt_s" in r) == (workload == "decode")
    assert "OPENMP" in cells[("prefill", 1, "llama.cpp", "f32")]["peer"]["build"]["system_info"]
    made = {p.name for p in (out / "peers").iterdir()}
    assert {"ct2-model", "llama-q4_K_M.gguf", "ort-int8.onnx", "checkpoint"} <= made


@pytest.mark.slow
@pytest.mark.integration
def test_a_variant_that_fails_its_check_is_reported_and_not_timed(tmp_path, monkeypatch):
    need("ctranslate2")
    monkeypatch.setitem(peers.TOLERANCES, "float32", (-1.0, 1.0))  # nothing is that close
    out = tmp_path / "run"
    assert main(["bench", *SMALL, "--out", str(out), "--precision", "fp32", "--workloads", "prefill", "--seq", "8",
                 "--peer", "ct2"]) == 0
    rows = [r for r in read_jsonl(str(out / "results.jsonl")) if r["kind"] == "workload"]
    failed = next(r for r in rows if r["backend"] == "ct2")
    assert failed["status"] == "failed_check" and "times_s" not in failed
    assert failed["message"].startswith("logits off by") and failed["peer"]["check"]["passed"] is False
    assert "vs_peer" not in next(r for r in rows if r["backend"] == "jax")
