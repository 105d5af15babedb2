"""The quality study: the precision report's quality part per checkpoint and window length, fp32 the reference."""

import json
from pathlib import Path

import pytest

from gptjax.bench.studies import main
from gptjax.errors import GptjaxError

TINY = Path(__file__).parent / "fixtures" / "trained_byte_tiny"  # context 64


def test_quality_per_window_length_against_fp32(tmp_path):
    out = tmp_path / "quality"
    assert main(["quality", "--checkpoint", str(TINY), "--seq-lens", "16,128", "--windows", "4", "--modes",
                 "fp32,int8", "--out", str(out)], log=lambda *a: None) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()[1:]]
    assert [(r["seq_len"], r.get("mode"), r["status"]) for r in rows] == [(16, "fp32", "ok"), (16, "int8", "ok"),
                                                                         (128, None, "skipped")]
    fp32, int8, skipped = rows
    assert fp32["top1_agreement"] == 1.0 and fp32["perplexity_change"] == 0.0 and fp32["max_logit_error"] == 0.0
    assert fp32["windows"] == 4 and fp32["predictions"] == 4 * 16
    assert int8["weight_bytes"] < fp32["weight_bytes"] and 0 < int8["top1_agreement"] <= 1
    assert skipped["message"] == "T=128 exceeds the context 64"
    assert "| 16 | int8 |" in (out / "results.md").read_text()


def test_quality_flags_are_checked_before_anything_runs(tmp_path):
    for flags, needle in (([], "needs --checkpoint DIR"), (["--checkpoint", "x", "--modes", "int8,fp32"],
                                                           "must start with fp32"),
                          (["--checkpoint", "x", "--seq-lens", "1"], "window lengths >= 2")):
        with pytest.raises(GptjaxError, match=needle):
            main(["quality", *flags, "--out", str(tmp_path / "q")])
    assert not (tmp_path / "q").exists()
