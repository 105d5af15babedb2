"""The speculative study's sample and gptjax.speculative.measure_gain: distinct held-out prompts, acceptance summed
over them with a bootstrap interval, speed-up as median with min-max, compile excluded (no test asserts a speed)."""

import json

import numpy as np
import pytest

from gptjax import GPTConfig, get_backend, init_params, timing
from gptjax.sampling import GREEDY
from gptjax.speculative import Gain, NgramDraft, gain_line, measure_gain

CONFIG = GPTConfig(vocab_size=64, n_positions=64, n_layer=1, n_head=2, n_embd=16)
PROMPTS = [[5, 17, 3, 5, 17, 3, 5], [1, 2, 3, 4, 1, 2, 3]]


def test_bootstrap_ci_is_seeded_and_resamples_whole_clusters():
    clusters = [(1, 10), (9, 10), (5, 10), (5, 10)]
    pooled = lambda cs: sum(a for a, _ in cs) / sum(p for _, p in cs)  # noqa: E731
    lo, hi = timing.bootstrap_ci(clusters, pooled, seed=3, n=500)
    assert (lo, hi) == timing.bootstrap_ci(clusters, pooled, seed=3, n=500)  # same seed, same interval
    assert 0.1 <= lo < 0.5 < hi <= 0.9  # every resample's pooled rate lies between the extreme clusters'
    assert timing.bootstrap_ci([(4, 8)] * 5, pooled) == (0.5, 0.5)  # identical clusters: no spread
    with pytest.raises(ValueError, match="at least one cluster"):
        timing.bootstrap_ci([], pooled)


def test_measure_gain_counts_the_speculative_call_and_keeps_greedy_tokens():
    backend = get_backend("numpy", CONFIG)
    params = init_params(CONFIG, seed=1)
    calls = []
    original = backend.generate

    def counting(*args, **kwargs):
        calls.append("draft" in kwargs)
        return original(*args, **kwargs)

    backend.generate = counting
    g = measure_gain(backend, params, PROMPTS, 6, GREEDY, NgramDraft(), 3, rounds=2)
    assert calls == [False, True] * 3  # one warm-up call each, then plain and speculative interleaved, 2 rounds
    direct = original(params, PROMPTS, 6, sampling=GREEDY, draft=NgramDraft(), num_speculative_tokens=3)
    assert (g.accepted, g.proposed, g.per_call) == (direct.accepted, direct.proposed,
                                                    [(direct.accepted, direct.proposed)])
    assert g.same_tokens and g.proposed > 0 and g.speedup_range[0] <= g.speedup <= g.speedup_range[1]
    assert g.tokens_per_s > 0 and g.plain_tokens_per_s > 0


def test_the_gain_line_says_compile_is_excluded_and_advises_dropping_a_slow_draft():
    fast = Gain(300.0, 200.0, 1.5, (1.4, 1.6), 37, 54, [(37, 54)], True)
    assert gain_line(fast, 3) == ("speculative 300.0 tok/s vs plain 200.0 tok/s = 1.50x (compile excluded, median "
                                  "of 3); 37/54 draft tokens accepted (68.5%)")
    slow = gain_line(fast._replace(tokens_per_s=100.0, speedup=0.5), 3)
    assert "= 0.50x" in slow and slow.endswith("drop --draft")


def test_the_study_decodes_distinct_heldout_prompts_and_reports_acceptance_with_an_interval(tmp_path):
    from gptjax.bench.studies import main

    log = []
    out = tmp_path / "spec"
    assert main(["speculative", "--target", "tiny", "--drafts", "ngram", "--ks", "2", "--batches", "1,2",
                 "--prompts", "3", "--prompt", "8", "--new", "500", "--runs", "1", "--out", str(out)],
                log=log.append) == 0
    assert "--new 500 capped to 56: prompt 8 + new must fit the context 64" in log
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()][1:]
    assert [(r["batch"], r["draft"], r["k"]) for r in rows] == [(1, "plain", 0), (1, "ngram", 2), (2, "plain", 0),
                                                                (2, "ngram", 2)]
    assert all(r["new"] == 56 and r["prompts"] == 3 for r in rows)
    b1, b2 = rows[1], rows[3]
    assert len(b1["per_call"]) == 3 and len(b2["per_call"]) == 2  # one call per prompt at B=1, per pair at B=2
    for r in (b1, b2):
        assert r["accepted"] == sum(a for a, _ in r["per_call"]) and r["proposed"] == sum(p for _, p in r["per_call"])
        assert r["acceptance"] == r["accepted"] / r["proposed"] and r["same_tokens"]
        lo, hi = r["acceptance_ci"]
        assert lo <= r["acceptance"] <= hi
        assert r["speedup_min"] <= r["speedup"] <= r["speedup_max"]
    assert rows[0]["acceptance"] is None and rows[0]["acceptance_ci"] is None
    assert "| 1 | ngram | 2 |" in (out / "results.md").read_text()


def test_heldout_prompts_are_distinct_windows():
    from gptjax import get_preset
    from gptjax.bench.studies.speculative import heldout_prompts

    prompts = heldout_prompts("tiny", get_preset("tiny"), 8, 32)
    assert len(prompts) == 8 and all(len(p) == 32 for p in prompts)
    assert len({tuple(p) for p in prompts}) == 8 and np.max(prompts) < 256
