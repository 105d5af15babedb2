"""`gptjax bench`: statistics helpers, FLOPs/bytes/MFU arithmetic, the JSONL schema, --compare, CLI errors and a
smoke run of the quick suite on the tiny preset (no test asserts a speed)."""

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from gptjax import get_preset, timing
from gptjax.bench import metrics
from gptjax.bench.ceilings import datasheet_for
from gptjax.bench.report import SCHEMA, compare_table, markdown_table, read_jsonl
from gptjax.bench.workloads import Job, Shape
from gptjax.cli import main
from gptjax.errors import GptjaxError

FIXTURES = Path(__file__).parent / "fixtures"
SMALL = ["--preset", "tiny", "--runs", "1", "--matmul-n", "64", "--bandwidth-mib", "4", "--no-plots"]


# ---- statistics -------------------------------------------------------------------------------------
def test_median_and_percentiles_on_known_data():
    xs = [float(v) for v in range(10, 0, -1)]  # 10 .. 1, unsorted on purpose
    assert timing.median(xs) == 5.5
    assert timing.median([3.0, 1.0, 2.0]) == 2.0
    assert timing.percentile(xs, 50) == pytest.approx(5.5)
    assert timing.percentile(xs, 90) == pytest.approx(9.1)  # linear: 1 + 0.9 * 9
    assert timing.percentile(xs, 99) == pytest.approx(9.91)
    assert timing.percentile(xs, 0) == 1.0 and timing.percentile(xs, 100) == 10.0
    assert timing.latency_summary(xs) == pytest.approx({"p50": 5.5, "p90": 9.1, "p99": 9.91})
    assert timing.latency_summary([]) == {}


def test_interleaved_times_alternates_and_rotates_inputs():
    calls = []
    times = timing.interleaved_times({"a": lambda i: calls.append(("a", i)), "b": lambda i: calls.append(("b", i))},
                                     runs=2, warmup=1)
    assert calls == [("a", -1), ("b", -1), ("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2}
    assert all(t >= 0 for v in times.values() for t in v)


# ---- FLOPs, bytes, MFU: hand-computed on the tiny preset (L=2, D=32, F=128, V=256) ----------------------
def test_flops_by_hand():
    tiny = get_preset("tiny")
    # N_mm = L(4D² + 2DF) = 2(4096 + 8192) = 24576; per position t: 2·N_mm + 2DV + 4LDt = 65536 + 256t
    # prefill B1 T4, last-position logits: 2·24576·4 + 2·32·256 + 2·2·32·4·5 = 196608 + 16384 + 2560
    assert metrics.prefill_flops(tiny, 1, 4) == 215552
    assert metrics.prefill_flops(tiny, 3, 4) == 3 * 215552
    # decode prompt 4, 3 new: the prefill yields token 1, then positions 5 and 6 (66816 + 67072)
    assert metrics.decode_flops(tiny, 1, 4, 3) == 215552 + 133888
    assert metrics.decode_flops(tiny, 2, 4, 1) == 2 * 215552
    # train B2 T4: 3 x forward with all logits: 3 · 2 · (65536·4 + 128·4·5)
    assert metrics.train_flops(tiny, 2, 4) == 3 * 2 * 264704


def test_bytes_and_utilisation_by_hand():
    tiny = get_preset("tiny")
    kv = 2 * 2 * 32 * 4  # K and V, 2 layers, width 32, fp32
    assert tiny.kv_cache_bytes_per_token("fp32") == kv
    assert metrics.decode_step_bytes(tiny, "fp32", "fp32", 2, 10) == tiny.weight_bytes("fp32") + 2 * kv * 10
    assert tiny.weight_bytes("w8a8") == tiny.weight_bytes("int8")  # w8a8 stores int8 weights
    assert metrics.train_step_bytes(tiny) == 36 * tiny.num_params()
    assert metrics.utilisation(1e9, 4e9) == 0.25
    assert metrics.utilisation(1e9, None) is None and metrics.utilisation(1e9, "unsupported: ...") is None


def test_row_mfu_and_bandwidth_arithmetic():
    from gptjax.bench.suite import _row

    ceiling = {"matmul_flops": {"fp32": 4e9, "bf16": "unsupported: x"}, "bandwidth": {"read": 8e9},
               "datasheet": {"flops": {"fp32": 1e10}, "hbm_bytes_per_s": 2e10}}
    job = Job(call=lambda i: None, flops=10**9, bytes_moved=2e9, memory={"params_bytes": 4})
    row = _row({"precision": "fp32"}, Shape("prefill", 2, seq=50), job, [1.5, 0.5, 1.0], ceiling, None)
    assert row["median_s"] == 1.0 and row["tokens_per_s"] == 100.0 and row["flops_per_s"] == 1e9
    assert row["mfu_measured"] == 0.25 and row["mfu_datasheet"] == 0.1
    assert row["bw_use_measured"] == 0.25 and row["bw_use_datasheet"] == 0.1
    assert row["latency_s"]["p50"] == 1.0
    bf16 = _row({"precision": "bf16"}, Shape("prefill", 2, seq=50), job, [1.0], ceiling, None)
    assert bf16["mfu_measured"] is None and bf16["mfu_datasheet"] is None  # unsupported / not in the datasheet


def test_datasheet_lookup_by_device_kind():
    assert datasheet_for("NVIDIA H100 80GB HBM3").name == "NVIDIA H100 SXM"
    assert datasheet_for("NVIDIA H100 PCIe").name == "NVIDIA H100 PCIe"
    assert datasheet_for("NVIDIA H200").flops["bf16"] == 989e12
    assert datasheet_for("NVIDIA A100-SXM4-40GB").hbm_bytes_per_s == 1.555e12
    assert datasheet_for("TPU v5 lite").name == "TPU v5e"
    assert datasheet_for("TPU v5p").name == "TPU v5p" and datasheet_for("TPU v4").name == "TPU v4"
    assert datasheet_for("cpu") is None


# ---- JSONL schema and --compare ---------------------------------------------------------------------
def test_read_jsonl_rejects_other_schemas_and_bad_lines(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text(json.dumps({"schema": "other/9"}) + "\n")
    with pytest.raises(GptjaxError, match="schema 'other/9'"):
        read_jsonl(str(bad))
    bad.write_text("{not json\n")
    with pytest.raises(GptjaxError, match="x.jsonl:1 is not valid JSON"):
        read_jsonl(str(bad))
    with pytest.raises(GptjaxError, match="cannot read"):
        read_jsonl(str(tmp_path / "missing.jsonl"))


def test_compare_on_fixture_files(capsys):
    assert main(["bench", "--compare", str(FIXTURES / "bench_old.jsonl"), str(FIXTURES / "bench_new.jsonl")]) == 0
    out = capsys.readouterr().out
    lines = {line.split(" | ")[1] + " " + line.split(" | ")[0]: line for line in out.splitlines()
             if line.startswith("| ") and "workload" not in line}
    assert "| 1,000.0 | 1,500.0 | 1.50x | 10.0 | 8.0 |  |" in lines["B1 T64 | prefill"]
    assert "| 200.0 | 100.0 | 0.50x | 5.0 | 10.0 | slower |" in lines["B1 P32+32 | decode"]
    assert "| 800.0 | 800.0 | 1.00x |" in lines["B8 P32+32 | decode"]
    assert "- only in new: decode B16 P32+32 jax fp32" in out
    assert "- only in old: train B4 T64 jax fp32" in out
    assert "T32" not in out  # skipped rows are not compared


def test_compare_table_is_a_function_of_rows():
    rows = read_jsonl(str(FIXTURES / "bench_old.jsonl"))
    assert "| 1.00x |" in compare_table(rows, rows) and "slower" not in compare_table(rows, rows)


# ---- the command: errors at the boundary ---------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--batch", "1,x"], "--batch '1,x': give a comma list of positive integers"),
    (["--batch", "0"], "--batch '0'"),
    (["--seq", "1000", "--preset", "tiny"], "--seq 1000 exceeds the context n_positions=64"),
    (["--precision", "fp16"], "--precision 'fp16'; allowed: fp32, bf16, int8, w8a8, int4"),
    (["--workloads", "prefil"], "--workloads 'prefil'; allowed: prefill, decode, train"),
    (["--runs", "0"], "--runs 0 must be >= 1"),
    (["--peer-threads", "0"], "--peer-threads 0 must be >= 1"),
])
def test_bad_values_are_clear_errors(argv, message, capsys, tmp_path):
    assert main(["bench", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_missing_peer_extra_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    assert main(["bench", "--peer", "hf", "--out", str(tmp_path), *SMALL]) == 2
    assert "--peer hf needs the `peer` extra" in capsys.readouterr().err


def test_missing_matplotlib_skips_plots_with_a_message(monkeypatch):
    from gptjax.bench.plots import make_plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert "plots skipped: matplotlib is not installed" in make_plots([], "/nonexistent")


# ---- smoke runs (tiny preset, one run each: seconds) ----------------------------------------------------
@pytest.mark.slow
def test_quick_suite_smoke_writes_schema_rows_table(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["bench", *SMALL, "--out", str(out), "--precision", "fp32,bf16", "--batch", "1,2", "--new", "4",
                 "--seq", "16"]) == 0
    rows = read_jsonl(str(out / "results.jsonl"))
    assert all(r["schema"] == SCHEMA for r in rows) and len({r["run"] for r in rows}) == 1
    kinds = [r["kind"] for r in rows]
    assert kinds[:2] == ["environment", "ceiling"]
    env = rows[0]["env"]
    for key in ("gptjax", "jax", "jaxlib", "flax", "git", "device_kind", "device_count", "cpu", "XLA_FLAGS",
                "peer_threads"):
        assert key in env
    assert set(rows[1]["matmul_flops"]) == {"fp32", "bf16", "int8"} and "read" in rows[1]["bandwidth"]
    work = {(r["workload"], r["batch"], r["precision"]): r for r in rows if r["kind"] == "workload"}
    assert set(work) == {("prefill", 1, p) for p in ("fp32", "bf16")} | {
        ("decode", b, p) for b in (1, 2) for p in ("fp32", "bf16")} | {("train", 4, p) for p in ("fp32", "bf16")}
    for key, r in work.items():
        assert r["status"] in ("ok", "skipped"), r
        if key[2] == "fp32":
            assert r["status"] == "ok"
            for field in ("tokens_per_s", "median_s", "compile_s", "flops", "flops_per_s", "mfu_measured",
                          "bytes_moved", "bw_use_measured", "latency_s", "memory", "times_s"):
                assert field in r, field
            assert set(r["latency_s"]) == {"p50", "p90", "p99"} and r["tokens_per_s"] > 0
    decode = work[("decode", 2, "fp32")]
    assert decode["flops"] == metrics.decode_flops(get_preset("tiny"), 2, 32, 4)
    assert "ttft_s" in decode and len(decode["per_token_s"]) == 3
    assert decode["flops_formula"] == "forward_flops(B=2, T=32, last_only=True) + 2·(forward_flops(1, 35) - " \
        "forward_flops(1, 32))"
    assert work[("train", 4, "fp32")]["flops_formula"] == "3·forward_flops(B=4, T=64)"
    assert decode["memory"]["cache_bytes"] == 2 * 36 * get_preset("tiny").kv_cache_bytes_per_token("fp32")
    table = (out / "results.md").read_text()
    assert "| prefill | B1 T16 | jax | fp32 |" in table and "| decode | B2 P32+4 | jax | fp32 |" in table
    assert "| matmul fp32 (64³) |" in table and f"environment: git {env['git']}; gptjax" in table
    assert "| decode | B2 P32+4 | jax | fp32 |" in capsys.readouterr().out


def test_peer_runs_interleaved_with_a_ratio(tmp_path):
    pytest.importorskip("transformers")  # the peer extra: not in the test extra (CI has no torch)
    out = tmp_path / "peer"
    assert main(["bench", *SMALL, "--out", str(out), "--precision", "fp32", "--workloads", "prefill,decode",
                 "--batch", "1", "--new", "3", "--seq", "8", "--peer", "hf"]) == 0
    rows = [r for r in read_jsonl(str(out / "results.jsonl")) if r["kind"] == "workload"]
    assert {(r["workload"], r["backend"]) for r in rows} == {(w, b) for w in ("prefill", "decode")
                                                            for b in ("jax", "hf")}
    for r in rows:
        assert r["status"] == "ok"
        assert ("vs_peer" in r) == (r["backend"] == "jax")
    hf_decode = next(r for r in rows if r["workload"] == "decode" and r["backend"] == "hf")
    assert "ttft_s" in hf_decode and len(hf_decode["per_token_s"]) == 2
    assert "vs peer" in markdown_table(rows)


def test_plots_are_written(tmp_path):
    out = tmp_path / "plots"
    argv = [a for a in SMALL if a != "--no-plots"]
    assert main(["bench", *argv, "--out", str(out), "--precision", "fp32", "--workloads", "prefill,decode",
                 "--batch", "1,2", "--new", "2", "--seq", "8"]) == 0
    assert {p.name for p in (out / "plots").iterdir()} == {"throughput_vs_batch.png", "roofline.png",
                                                          "latency_cdf.png"}


def test_time_budget_records_the_rest_as_skipped(tmp_path):
    from gptjax.bench.suite import Options, run

    options = Options(preset="tiny", precisions=("fp32",), workloads=("prefill", "decode"), runs=1, seqs=(8,),
                      batches=(1,), new=2, out=str(tmp_path), plots=False, time_budget=1e-9, matmul_n=32,
                      bandwidth_mib=1)
    rows = run(options, log=lambda *a: None)
    work = [r for r in rows if r["kind"] == "workload"]
    assert work and all(r["status"] == "skipped" and r["message"] == "time budget spent" for r in work)
    run(options, log=lambda *a: None)  # the same directory again: the file holds one run, not two
    assert len(read_jsonl(str(tmp_path / "results.jsonl"))) == len(rows)


def test_device_check_on_cpu(tmp_path, capsys):
    out = tmp_path / "dc"
    assert main(["bench", "--device-check", *SMALL, "--out", str(out), "--precision", "fp32,bf16",
                 "--workloads", "prefill", "--seq", "8"]) == 0
    checks = {c["precision"]: c for c in read_jsonl(str(out / "check.jsonl"))}
    fp32 = checks["fp32"]
    assert fp32["kind"] == "check" and fp32["passed"] and fp32["max_rel_logit_error"] < 1e-4
    assert fp32["preset"] == "tiny" and fp32["platform"] == "cpu"
    assert checks["bf16"]["status"] in ("ok", "skipped")  # skipped until the backend has precision modes
    assert (out / "results.jsonl").exists() and "PASS" in capsys.readouterr().out


# ---- the studies (`gptjax bench --study NAME`): tiny shapes, one run each -------------------------------
def _study(name: str, out: Path, *flags: str) -> tuple[dict, list[dict], str]:
    """Run one study; its environment row, its study rows and its results.md."""
    assert main(["bench", "--study", name, "--out", str(out), *flags]) == 0
    rows = read_jsonl(str(out / "results.jsonl"))
    assert all(r["schema"] == SCHEMA for r in rows) and len({r["run"] for r in rows}) == 1
    assert rows[0]["kind"] == "environment" and rows[0]["study"] == name and "git" in rows[0]["env"]
    study = rows[1:]
    assert all(r["kind"] == "study" and r["study"] == name and "load_avg_1m" in r for r in study)
    return rows[0], study, (out / "results.md").read_text()


def test_long_decode_study(tmp_path):
    env, rows, table = _study("long-decode", tmp_path, "--preset", "tiny", "--batch", "2", "--prompt", "8", "--new",
                              "16", "--runs", "2", "--modes", "fp32/fp32,int8/int8")
    assert env["args"] == {"preset": "tiny", "batch": 2, "prompt": 8, "new": 16, "modes": "fp32/fp32,int8/int8",
                           "runs": 2}
    assert [(r["precision"], r["kv_cache"]) for r in rows] == [("fp32", "fp32"), ("int8", "int8")]
    for r in rows:
        assert len(r["times_s"]) == 2 and r["step_s"] == timing.median(r["times_s"]) > 0
        assert r["tokens_per_s"] == pytest.approx(2 / r["step_s"])
    assert rows[0]["vs_fp32"] == 1.0 and "| int8 | int8 |" in table and "long-decode: tiny, B=2" in table


def test_kv_cache_study(tmp_path):
    _, [row], table = _study("kv-cache", tmp_path, "--preset", "tiny", "--prompt", "4", "--new", "6", "--runs", "2")
    assert row["same_tokens"] and len(row["cache_times_s"]) == len(row["recompute_times_s"]) == 2
    assert row["cache_tokens_per_s"] == pytest.approx(6 / timing.median(row["cache_times_s"]))
    assert row["speedup"] == pytest.approx(row["cache_tokens_per_s"] / row["recompute_tokens_per_s"])
    assert "(same tokens)" in table


def test_scaling_study_skips_a_mesh_larger_than_the_devices(tmp_path):
    _, rows, table = _study("scaling", tmp_path, "--preset", "tiny", "--batch", "4", "--seq-len", "8", "--runs", "1",
                            "--meshes", "2x1x1,1x1x16")
    ok, skipped = rows
    assert ok["mesh"] == "2x1x1" and ok["status"] == "ok" and len(ok["times_s"]) == 1 and ok["step_s"] > 0
    assert set(ok["comm_bytes"]) == {"data", "fsdp", "tensor"} and ok["comm_bytes"]["fsdp"] == 0
    assert skipped["status"] == "skipped" and skipped["message"] == "needs 16 devices, JAX sees 8"
    assert "| 1x1x16 | skipped: needs 16 devices" in table


def test_scaling_communication_estimates_by_hand():
    from gptjax.bench.studies.scaling import comm_bytes

    tiny = get_preset("tiny")
    P = 4 * tiny.num_params()
    assert comm_bytes(tiny, 8, 16, 1, 1, 1) == {"data": 0.0, "fsdp": 0.0, "tensor": 0.0}
    assert comm_bytes(tiny, 8, 16, 2, 1, 1)["data"] == pytest.approx(P)  # 2(d-1)/d·P
    assert comm_bytes(tiny, 8, 16, 1, 4, 1)["fsdp"] == pytest.approx(3 * 3 / 4 * P)
    # 4 all-reduces per layer, ring 2(t-1)/t, rows B/(d·f) = 4, [4, 16, 32] fp32 activations
    assert comm_bytes(tiny, 8, 16, 2, 1, 2)["tensor"] == pytest.approx(4 * 2 * 2 * (1 / 2) * 4 * 16 * 32 * 4)


@pytest.mark.slow  # three child processes, each starting JAX and compiling: about 40 s on 2 cores under load
def test_tracing_overhead_study(tmp_path):
    _, rows, table = _study("tracing-overhead", tmp_path, "--preset", "tiny", "--new", "4", "--chunk-size", "2",
                            "--runs", "1", "--rounds", "1")
    assert [r["variant"] for r in rows] == ["off", "on", "unsynced"]
    assert rows[0]["spans"] == 0 and rows[0]["cost_vs_off"] == 0
    assert rows[1]["spans"] > 0 and rows[2]["spans"] == rows[1]["spans"]
    assert all(len(r["process_median_s"]) == 1 and r["tokens_per_s"] > 0 for r in rows)
    assert "| on (SDK + batch exporter, synced) |" in table


def test_load_memory_study(tmp_path):
    _, [row], table = _study("load-memory", tmp_path, "--preset", "tiny", "--dir", str(tmp_path))
    assert row["params_bytes"] == 4 * get_preset("tiny").num_params()
    assert row["file_bytes"] >= row["params_bytes"] and row["rss_after_bytes"] >= row["rss_before_bytes"]
    assert row["growth_vs_file"] == row["growth_bytes"] / row["file_bytes"] and row["load_s"] > 0
    assert "the file" in table


@pytest.mark.slow  # starts `gptjax serve` in a subprocess and compiles its buckets: about 35 s on 2 cores
def test_serve_load_study(tmp_path):
    _, rows, table = _study("serve-load", tmp_path, "--preset", "tiny", "--concurrency", "1,2", "--requests", "2",
                            "--rounds", "1", "--prompt", "4", "--max-tokens", "4", "--max-batch", "2")
    assert [r["clients"] for r in rows] == [1, 2]
    for r in rows:
        assert r["ok"] == r["requests"] == 2 and r["server_exit_status"] == 0 and len(r["tokens_per_s_rounds"]) == 1
        assert r["server_200"] == 2 and r["server_tokens"] == r["client_tokens"] == 8  # /metrics = the client's
        assert r["ttft_p50_s"] > 0 and r["tokens_per_s"] > 0
    assert "| 2 | 2/2 |" in table


@pytest.mark.parametrize("argv, message", [
    (["--study"], "--study nothing; allowed: long-decode, kv-cache, scaling, serve-load, tracing-overhead, "
                  "load-memory"),
    (["--study", "nope"], "--study 'nope'; allowed:"),
    (["--study", "long-decode", "--new", "8"], "--new 8 must be >= 16"),
    (["--study", "long-decode", "--modes", "int8"], "each mode is precision/kv_cache"),
    (["--study", "kv-cache", "--preset", "tiny", "--new", "64"], "--prompt 32 + --new 64 must fit n_positions=64"),
    (["--study", "scaling", "--meshes", "2x2"], "--meshes '2x2': give data x fsdp x tensor sizes"),
    (["--study", "serve-load", "--concurrency", "0"], "--concurrency '0': give a comma list of positive integers"),
    (["--study", "int4", "--parts", "speed,x"], "--parts 'speed,x'; give a comma list of symmetry, quality, speed"),
    (["--study", "int4", "--group-sizes", "16"], "--group-sizes '16'; give a comma list of 32, 64, 128"),
    (["--study", "int4", "--parts", "quality"], "the symmetry and quality parts need --checkpoint"),
    (["--study", "int4", "--checkpoint", str(FIXTURES / "trained_byte_tiny")],  # n_embd 64
     f"--group-sizes 128 must divide --checkpoint {FIXTURES / 'trained_byte_tiny'}'s input widths 64, 256"),
    (["--study", "int4", "--parts", "speed", "--preset", "tiny", "--group-sizes", "32", "--runs", "0"],
     "--windows 128 and --runs 0 must be >= 1"),
])
def test_bad_study_values_are_clear_errors(argv, message, capsys, tmp_path):
    assert main(["bench", "--out", str(tmp_path / "x"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing measured, nothing written


def test_each_study_has_help(capsys):
    from gptjax.bench.studies import STUDIES

    for name in STUDIES:
        with pytest.raises(SystemExit) as done:
            main(["bench", "--study", name, "--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        usage, description = out.split("\n\n")[:2]
        assert usage.startswith(f"usage: gptjax bench --study {name}") and "--out DIR" in out
        study = importlib.import_module(f"gptjax.bench.studies.{STUDIES[name]}")
        assert description == study.__doc__.split("\n\n")[0]  # the study's docstring is its --help


def test_int4_study_symmetric_rounding_is_the_int4_format():
    """The symmetry part's "symmetric" row rounds exactly as gptjax's int4 quantiser stores weights."""
    from gptjax.bench.studies.int4 import rounded
    from gptjax.quantize import dequantize_int4, quantize_int4

    w = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)  # [in, out], groups along in
    r = np.moveaxis(rounded(np.moveaxis(w, 0, -1), 32, "symmetric"), -1, 0)
    assert np.array_equal(r, dequantize_int4(*quantize_int4(w, 0, 32), 0, 32))
    assert not np.array_equal(r, np.moveaxis(rounded(np.moveaxis(w, 0, -1), 32, "asymmetric"), -1, 0))


# ---- the harness under the other timed code: precision_report.speed --------------------------------------
def test_interleaved_runs_returns_what_each_run_measured():
    calls = []
    found = timing.interleaved_runs({"a": lambda i: calls.append(("a", i)) or 10 * i,
                                     "b": lambda i: calls.append(("b", i)) or -i}, runs=2, warmup=1)
    assert calls == [("a", -1), ("b", -1), ("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert found == {"a": [0, 10], "b": [0, -1]}


def test_stamps_and_timed_read_the_harness_clock(monkeypatch):
    ticks = iter(range(100))
    monkeypatch.setattr(timing, "clock", lambda: float(next(ticks)))
    assert timing.stamps("xyz") == [(1.0, "x"), (2.0, "y"), (3.0, "z")]  # clock 0 at the start
    assert timing.timed_value(lambda: "v") == ("v", 1.0) and timing.timed(lambda: None) == 1.0


class _Chunk:
    def __init__(self, tokens):
        self.tokens = tokens


class _FakeBackend:
    """forward and stream as the precision report calls them, logging each call."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def forward(self, weights, tokens, last_only):
        self.log.append((self.name, "forward", tokens.shape))

    def stream(self, weights, prompts, new, chunk_size, sampling):
        self.log.append((self.name, "stream", len(prompts)))
        yield _Chunk([[0] for _ in prompts])  # the prefill's token
        yield _Chunk([[0] * (new - 1) for _ in prompts])


def test_precision_report_speed_times_on_the_harness(monkeypatch):
    from gptjax.precision_report import Mode, speed

    ticks = iter(range(10_000))
    monkeypatch.setattr(timing, "clock", lambda: float(next(ticks)))  # every reading 1 s after the last
    log, progress = [], []
    built = [(Mode("fp32"), _FakeBackend("a", log), None, 0), (Mode("int8"), _FakeBackend("b", log), None, 0)]
    out = speed(built, get_preset("tiny"), prompt=4, new_tokens=5, batches=(1, 3), prefill_len=16, runs=2,
                progress=progress.append)
    # one warm-up round, then the modes in turn (A B A B), each prefill then decode per batch size
    assert progress == [f"warm-up {m}" for m in ("fp32", "int8")] + [f"round {n}/2 {m}" for n in (1, 2)
                                                                    for m in ("fp32", "int8")]
    assert log[:3] == [("a", "forward", (1, 16)), ("a", "stream", 1), ("a", "stream", 3)] and len(log) == 18
    # prefill: 16 tokens in 1 s; decode: B·(new - 1) tokens from the prefill's chunk to the last, 1 s apart
    assert out == [{"prefill": 16.0, "decode": {1: 4.0, 3: 12.0}}] * 2


def test_train_mfu_uses_the_suite_ceiling():
    import gptjax.train as train
    from gptjax.bench.ceilings import matmul_flops

    assert not hasattr(train, "measure_peak_flops") and train.matmul_flops is matmul_flops
    assert matmul_flops("fp32", 64, runs=1) > 0 and matmul_flops("bf16", 64, runs=1) > 0


# ---- MFU against the ceiling a row runs on (issue 30: never above 100%) ------------------------------
CEILING = {"matmul_n": 64, "matmul_flops": {"fp32": 1e9, "bf16": 1e9, "int8": 2e9},
           "kernel_flops": {"bf16": 4e9, "int8": 8e9}, "bandwidth_bytes": 2**20, "bandwidth": {"read": 8e9}}


def test_each_mode_takes_the_ceiling_it_runs_on():
    expect = {"fp32": ("xla fp32", 1e9), "bf16": ("kernel bf16", 4e9), "int8": ("kernel int8", 8e9),
              "w8a8": ("kernel int8", 8e9), "int4": ("kernel int8", 8e9), "fp8": ("xla fp32", 1e9)}
    assert {m: metrics.ceiling_for({"precision": m}, CEILING, kernels=True) for m in expect} == expect
    without = {"fp32": ("xla fp32", 1e9), "bf16": ("xla bf16", 1e9), "int8": ("xla fp32", 1e9),
               "w8a8": ("xla int8", 2e9), "int4": ("xla fp32", 1e9), "fp8": ("xla fp32", 1e9)}
    assert {m: metrics.ceiling_for({"precision": m}, CEILING, kernels=False) for m in without} == without
    no_kernels = CEILING | {"kernel_flops": {}}  # GPTJAX_CPU_KERNELS=0 or an accelerator: none measured
    assert metrics.ceiling_for({"precision": "w8a8"}, no_kernels, kernels=True) == ("xla int8", 2e9)
    unsupported = CEILING | {"matmul_flops": {"fp32": 1e9, "bf16": "unsupported: x"}}
    assert metrics.ceiling_for({"precision": "bf16"}, unsupported, kernels=False) == ("xla bf16", None)
    peer = {"precision": "fp32", "peer": {"name": "hf"}}
    assert metrics.ceiling_for(peer, CEILING, kernels=False) == ("-", None)
    assert metrics.ceiling_for(peer | {"peak_flops": 3e9}, CEILING, kernels=False) == ("peer", 3e9)


def test_a_row_above_its_ceiling_is_flagged_and_never_printed_as_a_percentage():
    from gptjax.bench.suite import _row

    job = Job(call=lambda i: None, flops=10**9, bytes_moved=2e9, memory={"params_bytes": 4})
    fast = _row({"precision": "w8a8", "backend": "jax"}, Shape("prefill", 1, seq=128), job, [0.1], CEILING, None)
    assert fast["flops_per_s"] == 1e10 and fast["mfu"] == 1.25 and fast["mfu_ceiling"] == "kernel int8"
    assert fast["ceiling_low"] is True and fast["mfu_xla"] == fast["mfu_measured"] == 5.0
    ok = _row({"precision": "bf16", "backend": "jax"}, Shape("prefill", 1, seq=128), job, [0.5], CEILING, None)
    assert ok["mfu"] == 0.5 and ok["mfu_ceiling"] == "kernel bf16" and ok["ceiling_low"] is False
    rows = [r | {"kind": "workload", "workload": "prefill", "batch": 1, "seq": 128} for r in (fast, ok)]
    table = markdown_table(rows)
    assert "| > ceiling (re-measure at a larger --matmul-n) | kernel int8 |" in table
    assert "| 50.0% | kernel bf16 |" in table and "125.0%" not in table and "500.0%" not in table
    assert metrics.mfu_text({"mfu": None}) == "-" and metrics.mfu_text({"mfu": 1.0}) == "100.0%"


def test_the_busy_warning_names_the_peer_only_when_one_was_asked_for():
    from gptjax.bench.results import warn_if_busy

    env = {"platform": "cpu", "load_avg_1m": 3.0, "cores": 2}
    alone, with_peer = [], []
    warn_if_busy(env, alone.append)
    warn_if_busy(env, with_peer.append, peer=True)
    assert alone == [("warning: 1-minute load average 3.0 on 2 cores before the run: other work competes for the "
                      "CPU; timings are noisy")]
    assert "the peer (OpenMP) suffers more than XLA" in with_peer[0] and "OpenMP" not in alone[0]
    quiet = []
    warn_if_busy(env | {"load_avg_1m": 0.5}, quiet.append, peer=True)
    assert quiet == []
