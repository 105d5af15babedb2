"""MFU's denominator: the machine's matmul ceiling measured once and cached per machine (gptjax.peaks), or given
(--peak-flops, $GPTJAX_PEAK_FLOPS); a training start with the ceiling cached runs no matmul benchmark."""

import json
import logging

import pytest

from gptjax import GPTConfig, GptjaxError, peaks
from gptjax.train import TrainConfig, TrainOptions, train


@pytest.fixture
def measured(monkeypatch):
    """The sizes matmul_flops was asked to measure (each call "measures" 2e11 FLOP/s)."""
    calls = []

    def fake(dtype, n, runs=5):
        calls.append((dtype, n))
        return 2e11

    monkeypatch.setattr(peaks, "matmul_flops", fake)
    monkeypatch.delenv(peaks.PEAK_ENV, raising=False)
    return calls


def test_the_ceiling_is_measured_once_then_read_from_the_cache(tmp_path, measured):
    first = peaks.cached_ceiling("fp32", 64, tmp_path)
    second = peaks.cached_ceiling("fp32", 64, tmp_path)
    assert measured == [("fp32", 64)] and first.flops == second.flops == 2e11
    assert first.source == f"fp32 matmul 64³ measured now, cached in {tmp_path / 'ceilings.json'}"
    assert second.source.startswith("fp32 matmul 64³ measured 20") and second.source.endswith("ceilings.json")
    saved = json.loads((tmp_path / "ceilings.json").read_text())
    assert saved["format"] == 1 and list(saved["ceilings"]) == [peaks.machine_key("fp32", 64)]
    assert peaks.cached_ceiling("bf16", 64, tmp_path).flops == 2e11 and measured[-1] == ("bf16", 64)  # its own key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ceilings.json"]  # no temporary file left


def test_the_key_names_what_the_ceiling_depends_on():
    import jax

    key = peaks.machine_key("bf16", 1024)
    assert key.startswith(f"{jax.devices()[0].platform} ") and f"jax {jax.__version__}" in key
    assert key.endswith("| bf16 1024") and key != peaks.machine_key("fp32", 1024)


@pytest.mark.parametrize("content", ["{not json", '{"format": 0, "ceilings": {}}', '{"format": 1, "ceilings": []}',
                                     '{"format": 1, "ceilings": {"KEY": {"flops": "fast"}}}'])
def test_a_cache_file_that_is_corrupt_or_of_another_format_is_measured_again(tmp_path, measured, content):
    (tmp_path / "ceilings.json").write_text(content.replace("KEY", peaks.machine_key("fp32", 64)))
    assert peaks.cached_ceiling("fp32", 64, tmp_path).flops == 2e11 and len(measured) == 1
    assert json.loads((tmp_path / "ceilings.json").read_text())["ceilings"][peaks.machine_key("fp32", 64)]["flops"] \
        == 2e11


def test_an_unwritable_cache_still_gives_the_measurement(tmp_path, measured):
    (tmp_path / "file").write_text("a regular file, where the cache directory would go")
    peak = peaks.cached_ceiling("fp32", 64, tmp_path / "file" / "cache")
    assert peak.flops == 2e11 and "measured now (not cached:" in peak.source and "(ENOTDIR)" in peak.source


def test_a_given_peak_replaces_the_ceiling(tmp_path, measured, monkeypatch):
    assert peaks.mfu_peak("fp32", 5e10, tmp_path) == peaks.Peak(5e10, "given (--peak-flops)")
    monkeypatch.setenv(peaks.PEAK_ENV, "7e12")
    assert peaks.mfu_peak("fp32", None, tmp_path) == peaks.Peak(7e12, "given ($GPTJAX_PEAK_FLOPS)")
    assert measured == [] and not (tmp_path / "ceilings.json").exists()
    for name, given, env in (("--peak-flops", 0.0, "1"), ("--peak-flops", float("nan"), "1"),
                             ("GPTJAX_PEAK_FLOPS", None, "fast"), ("GPTJAX_PEAK_FLOPS", None, "-1")):
        monkeypatch.setenv(peaks.PEAK_ENV, env)
        with pytest.raises(GptjaxError, match=f"{name}=.* must be a number of FLOP/s > 0"):
            peaks.mfu_peak("fp32", given, tmp_path)


def test_a_training_start_reads_the_cached_ceiling_and_runs_no_benchmark(tmp_path, corpus, measured, monkeypatch,
                                                                         caplog):
    monkeypatch.setenv("GPTJAX_CACHE", str(tmp_path / "cache"))
    peaks.cached_ceiling("fp32")  # a previous run on this machine measured it

    def benchmark(*args, **kwargs):
        raise AssertionError("a matmul benchmark ran at the start of training")

    monkeypatch.setattr(peaks, "matmul_flops", benchmark)
    config = GPTConfig(vocab_size=256, n_positions=16, n_layer=1, n_head=2, n_embd=16)
    tc = TrainConfig(batch_size=2, max_steps=1, warmup_steps=0, eval_batches=1)
    with caplog.at_level(logging.INFO, logger="gptjax.train"):
        train(config, tc, tmp_path / "run", TrainOptions(data_spec=corpus, progress=False))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("MFU peak"))
    assert line.startswith("MFU peak: 2e+11 FLOP/s (fp32 matmul 1024³ measured ") and "cached in" in line


def test_a_kernel_ceiling_is_measured_on_the_kernel_and_cached_under_its_own_key(tmp_path, monkeypatch):
    import jax.numpy as jnp

    monkeypatch.delenv(peaks.PEAK_ENV, raising=False)
    used = []

    def kernel(x, w):
        used.append(x.shape)
        return jnp.matmul(x, w)

    peak = peaks.cached_ceiling("bf16", 32, tmp_path, kernel=kernel)
    assert used and peak.flops > 0 and peak.source.startswith("bf16 kernel matmul 32³ measured now")
    assert list(json.loads((tmp_path / "ceilings.json").read_text())["ceilings"]) == [peaks.machine_key("bf16 kernel",
                                                                                                         32)]
    monkeypatch.setattr(peaks, "MATMUL_N", 32)
    assert peaks.mfu_peak("bf16", None, tmp_path, kernel=kernel).flops == peak.flops  # read back, not re-measured


def test_bf16_training_takes_the_peak_of_the_kernel_its_matmuls_run_on():
    from gptjax.backends import cpu_kernels
    from gptjax.train import run

    assert run._matmul_kernel("fp32", None) is None
    assert run._matmul_kernel("bf16", object()) is None  # on a mesh: XLA's dots
    assert run._matmul_kernel("bf16", None) is (cpu_kernels.bf16_matmul if cpu_kernels.available() else None)
