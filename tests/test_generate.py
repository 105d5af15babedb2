"""Generation on both backends: cache correctness, ragged batches, sampling rules, streaming, compiles, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import GPTConfig, GptjaxError, get_backend, init_params
from gptjax.backends.jax import GPT, KVCache
from gptjax.backends.jax import decode as jax_decode
from gptjax.backends.numpy_ref import FloatCache, gpt2, ragged_mask
from gptjax.generate import filter_logits, sample_token
from gptjax.sampling import GREEDY, SamplingParams

CONFIG = GPTConfig(vocab_size=97, n_positions=64, n_layer=2, n_head=4, n_embd=32)
BACKENDS = ["numpy", "jax"]


def _params(config=CONFIG, seed=0):
    """GPT-2 init with every parameter perturbed, so that greedy continuations are varied."""
    rng = np.random.default_rng(seed)
    return {k: v + rng.normal(0, 0.3, v.shape).astype(np.float32) for k, v in init_params(config, seed).items()}


PARAMS = _params()
PROMPTS = [[5, 17, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42], [8, 8, 8, 8, 8]]


# ---- the cache reproduces the full forward pass ----------------------------------------------------------
def _numpy_cached_logits(tokens, pad, S):
    """Last-position logits after prefill of left-padded tokens, then after each appended token."""
    c = CONFIG
    B, Tp = tokens.shape
    cache = [FloatCache((B, c.n_head, S, c.head_dim), np.float32, np.float32) for _ in range(c.n_layer)]
    run = dict(p=PARAMS, n_layer=c.n_layer, n_head=c.n_head, eps=c.layer_norm_epsilon, last_only=True, cache=cache)
    positions = np.maximum(np.arange(Tp)[None] - pad[:, None], 0)
    return gpt2(tokens, positions=positions, mask=ragged_mask(pad, 0, Tp, S, np.float32), start=0, **run), run


def test_numpy_cached_decode_equals_uncached_forward():
    rng = np.random.default_rng(1)
    seq = rng.integers(0, 97, 20)
    backend = get_backend("numpy", CONFIG)
    for pad_len in (0, 3):  # the same row with and without left padding
        tokens = np.concatenate([np.zeros(pad_len, int), seq[:6]])[None]
        logits, run = _numpy_cached_logits(tokens, np.array([pad_len]), S=pad_len + 20)
        np.testing.assert_allclose(logits, backend.forward(PARAMS, seq[None, :6], last_only=True), atol=1e-4)
        for i in range(6, 20):
            index = pad_len + i - 1 + 1  # cache index of token seq[i]
            logits = gpt2(seq[None, i:i + 1], positions=np.array([[i]]),
                          mask=ragged_mask(np.array([pad_len]), index, 1, pad_len + 20, np.float32), start=index,
                          **run)
            np.testing.assert_allclose(logits, backend.forward(PARAMS, seq[None, : i + 1], last_only=True),
                                       atol=1e-4)


def test_jax_cached_decode_equals_uncached_forward():
    model = GPT(CONFIG, PARAMS)
    rng = np.random.default_rng(2)
    seqs = rng.integers(0, 97, (2, 20))
    pad = jnp.array([0, 4])  # row 1 is left-padded by 4
    S, Tp = 32, 10
    tokens = np.zeros((2, Tp), np.int32)
    tokens[0], tokens[1, 4:] = seqs[0, :10], seqs[1, :6]
    cache = KVCache.zeros(CONFIG, 2, S)
    positions = jnp.maximum(jnp.arange(Tp)[None] - pad[:, None], 0)
    logits, cache = model.step(tokens, positions, jax_decode.prefill_masks(pad, Tp), cache, 0)
    full = get_backend("numpy", CONFIG)
    expected = [full.forward(PARAMS, seqs[:1, :10], last_only=True), full.forward(PARAMS, seqs[1:, :6],
                                                                                     last_only=True)]
    np.testing.assert_allclose(np.asarray(logits), np.concatenate(expected), atol=1e-4)
    lengths = np.array([10, 6])
    for step in range(8):
        index = Tp + step
        nxt = np.array([seqs[0, lengths[0]], seqs[1, lengths[1]]])
        logits, cache = model.step(jnp.asarray(nxt[:, None]), jnp.asarray((index - pad)[:, None]),
                                   jax_decode.decode_masks(pad, index, S), cache, index)
        lengths += 1
        expected = [full.forward(PARAMS, seqs[b:b + 1, : lengths[b]], last_only=True) for b in range(2)]
        np.testing.assert_allclose(np.asarray(logits), np.concatenate(expected), atol=1e-4)


# ---- greedy: backends agree, ragged rows are independent ---------------------------------------------------
def _greedy_reference(prompt, n):
    """Greedy continuation by full recomputation (no cache), the picoGPT way."""
    backend, seq = get_backend("numpy", CONFIG), list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(backend.forward(PARAMS, [seq], last_only=True)[0])))
    return seq[len(prompt):]


@pytest.mark.parametrize("name", BACKENDS)
def test_greedy_equals_recomputation_and_rows_are_independent(name):
    backend = get_backend(name, CONFIG)
    batched = backend.generate(PARAMS, PROMPTS, 12, sampling=GREEDY)
    for row, prompt in enumerate(PROMPTS):
        expected = _greedy_reference(prompt, 12)
        assert batched.tokens[row] == expected
        assert backend.generate(PARAMS, [prompt], 12, sampling=GREEDY).tokens[0] == expected
    assert batched.finish_reasons == ["length"] * 4 and batched.prompt_lengths == [3, 11, 1, 5]
    assert len({tuple(t) for t in batched.tokens}) == 4  # the rows really differ


def test_greedy_tokens_identical_across_backends():
    for config, seed in [(CONFIG, 3), (GPTConfig(vocab_size=256, n_positions=48, n_layer=3, n_head=2, n_embd=24,
                                                 tie_word_embeddings=False), 4)]:
        params = _params(config, seed)
        prompts = [[1, 2, 3, 4], [9], list(range(30, 50))]
        a = get_backend("numpy", config).generate(params, prompts, 20, sampling=GREEDY)
        b = get_backend("jax", config).generate(params, prompts, 20, sampling=GREEDY)
        assert a.tokens == b.tokens


@pytest.mark.parametrize("name", BACKENDS)
def test_temperature_zero_is_greedy(name):
    backend = get_backend(name, CONFIG)
    assert backend.generate(PARAMS, PROMPTS, 6, sampling=SamplingParams(temperature=0)).tokens == \
        backend.generate(PARAMS, PROMPTS, 6, sampling=GREEDY).tokens


# ---- sampling ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("kwargs", [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                    dict(temperature=1.3, top_p=0.8), dict(top_k=10, top_p=0.5)])
def test_same_seed_same_tokens_other_seed_other_tokens(name, kwargs):
    backend = get_backend(name, CONFIG)
    seeded = SamplingParams(seed=11, **kwargs)
    a = backend.generate(PARAMS, PROMPTS, 10, sampling=seeded)
    assert a.tokens == backend.generate(PARAMS, PROMPTS, 10, sampling=seeded).tokens
    assert a.tokens == get_backend(name, CONFIG).generate(PARAMS, PROMPTS, 10, sampling=seeded).tokens
    assert a.tokens != backend.generate(PARAMS, PROMPTS, 10, sampling=SamplingParams(seed=12, **kwargs)).tokens


LOGITS = np.log(np.array([0.30, 0.25, 0.15, 0.10, 0.08, 0.05, 0.04, 0.02, 0.01], np.float32))


@pytest.mark.parametrize("top_k,top_p,support", [
    (None, None, range(9)), (3, None, [0, 1, 2]), (1, None, [0]), (None, 0.5, [0, 1]),
    (None, 0.54, [0, 1]), (None, 0.56, [0, 1, 2]), (None, 0.01, [0]), (4, 0.9, [0, 1, 2, 3]),
    (4, 0.8, [0, 1, 2]), (2, 0.99, [0, 1]),
])
def test_filters_keep_exactly_the_expected_support(top_k, top_p, support):
    kept_np = np.flatnonzero(np.isfinite(filter_logits(LOGITS.astype(np.float64), top_k, top_p)))
    x = jax_decode.filter_top_k_top_p(jnp.asarray(LOGITS)[None], jnp.array([top_k or 9]),
                                      jnp.array([top_p or 1.0], jnp.float32))
    kept_jax = np.flatnonzero(np.isfinite(np.asarray(x[0])))
    assert list(kept_np) == list(kept_jax) == list(support)


@pytest.mark.parametrize("top_k,top_p", [(None, None), (3, None), (None, 0.56), (4, 0.9)])
def test_sampling_frequencies_follow_the_renormalised_distribution(top_k, top_p):
    n = 20_000
    support = np.isfinite(filter_logits(LOGITS.astype(np.float64), top_k, top_p))
    expected = np.where(support, np.exp(LOGITS), 0)
    expected /= expected.sum()
    sampling = jax_decode.Sampling(jnp.ones(n), jnp.full(n, top_k or 9), jnp.full(n, top_p or 1.0), jnp.array([-1]))
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(0), jnp.arange(n))
    drawn = jax_decode.sample(jnp.tile(jnp.asarray(LOGITS), (n, 1)), keys, jnp.int32(0), sampling,
                              mode="filter" if top_k is not None or top_p is not None else "sample")
    counts_jax = np.bincount(np.asarray(drawn), minlength=9) / n
    rng = np.random.default_rng(0)
    sp = SamplingParams(top_k=top_k, top_p=top_p)
    counts_np = np.bincount([sample_token(LOGITS, sp, rng) for _ in range(5000)], minlength=9) / 5000
    assert set(np.flatnonzero(counts_jax)) <= set(np.flatnonzero(support))
    assert set(np.flatnonzero(counts_np)) <= set(np.flatnonzero(support))
    assert np.abs(counts_jax - expected).max() < 0.015  # ~4 standard errors at n=20,000
    assert np.abs(counts_np - expected).max() < 0.03


def test_temperature_sharpens_and_flattens():
    n = 20_000
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(1), jnp.arange(n))
    top = {}
    for t in (0.3, 1.0, 3.0):
        sampling = jax_decode.Sampling(jnp.full(n, t), jnp.full(n, 9), jnp.ones(n), jnp.array([-1]))
        drawn = np.asarray(jax_decode.sample(jnp.tile(jnp.asarray(LOGITS), (n, 1)), keys, jnp.int32(0), sampling,
                                             mode="sample"))
        top[t] = (drawn == 0).mean()
    p = np.exp(LOGITS / 0.3) / np.exp(LOGITS / 0.3).sum()
    assert top[0.3] == pytest.approx(p[0], abs=0.015)
    assert top[0.3] > top[1.0] > top[3.0]


# ---- stop tokens, streaming -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
def test_stop_tokens_end_rows_independently(name):
    backend = get_backend(name, CONFIG)
    free = backend.generate(PARAMS, PROMPTS, 12, sampling=GREEDY).tokens
    stop = next(t for t in free[0] if any(t not in other for other in free[1:]))  # ends row 0, not all rows
    result = backend.generate(PARAMS, PROMPTS, 12, sampling=SamplingParams(greedy=True, stop_tokens=[stop]))
    for row, tokens in enumerate(free):
        cut = tokens.index(stop) if stop in tokens else len(tokens)
        assert result.tokens[row] == tokens[:cut]
        assert result.finish_reasons[row] == ("stop" if stop in tokens else "length")
    assert "length" in result.finish_reasons and "stop" in result.finish_reasons


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 3, 16])
def test_stream_concatenates_to_generate(name, chunk_size):
    backend = get_backend(name, CONFIG)
    sampling = SamplingParams(temperature=0.9, top_p=0.9, seed=5, stop_tokens=[7, 8])
    whole = backend.generate(PARAMS, PROMPTS, 10, sampling=sampling)
    chunks = list(backend.stream(PARAMS, PROMPTS, 10, chunk_size=chunk_size, sampling=sampling))
    joined = [sum((c.tokens[row] for c in chunks), []) for row in range(len(PROMPTS))]
    assert joined == whole.tokens
    assert [r or "length" for r in chunks[-1].finish_reasons] == whole.finish_reasons
    assert len(chunks) == 1 + -(-9 // chunk_size) or any(r == "stop" for r in whole.finish_reasons)
    assert chunks[0].phase == "prefill" and all(len(t) <= 1 for t in chunks[0].tokens)  # TTFT: right after prefill
    for c in chunks[1:]:
        assert c.phase == "decode" and all(len(t) <= chunk_size for t in c.tokens)


def test_jax_loop_ends_when_every_row_has_stopped():
    backend = get_backend("jax", CONFIG)
    free = backend.generate(PARAMS, [[5, 17, 3]], 30, sampling=GREEDY).tokens[0]
    stop = free[2]
    chunks = list(backend.stream(PARAMS, [[5, 17, 3]], 30, chunk_size=1,
                                 sampling=SamplingParams(greedy=True, stop_tokens=[stop])))
    assert len(chunks) == free.index(stop) + 1  # one sampled token per chunk, none after the stop


# ---- compilations ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_mixed_workload_compiles_once_per_bucket():
    config = GPTConfig(vocab_size=64, n_positions=128, n_layer=1, n_head=2, n_embd=16)
    backend, params = get_backend("jax", config), _params(config, 7)
    weights = backend.prepare(params)
    sizes = lambda: (jax_decode.prefill._cache_size(), jax_decode.decode._cache_size())  # noqa: E731
    before = sizes()
    # prompt lengths 2..8 (bucket 8), 3 rows (batch bucket 4), 3..8 new tokens (bucket 8), any sampling
    for i, (n_prompt, n_new) in enumerate([(2, 3), (5, 8), (8, 4), (3, 7)]):
        prompts = [[1] * n_prompt, [2] * (n_prompt // 2 + 1), [3]]
        backend.generate(weights, prompts, n_new, sampling=SamplingParams(temperature=0.5 + i / 4, seed=i))
        backend.generate(weights, prompts[:1], n_new,
                         sampling=SamplingParams(temperature=1.5, seed=i))  # batch 1: its own bucket
    assert np.subtract(sizes(), before).tolist() == [2, 2]  # (B=4 and B=1) x one (Tp=8, S=16) bucket
    backend.generate(weights, [[1] * 9], 8, sampling=SamplingParams(top_k=5))  # new prompt bucket and top-k filtering
    assert np.subtract(sizes(), before).tolist() == [3, 3]
    backend.generate(weights, [[1] * 12], 8, sampling=SamplingParams(top_k=9, top_p=0.3))  # same buckets and mode
    assert np.subtract(sizes(), before).tolist() == [3, 3]
    backend.generate(weights, [[1] * 12], 8, sampling=GREEDY)  # greedy skips the draw: its own mode
    assert np.subtract(sizes(), before).tolist() == [4, 4]


# ---- bad input --------------------------------------------------------------------------------------------------
BAD = [
    (dict(prompts=[[1, 2]], max_new_tokens=0), r"max_new_tokens=0 must be an integer >= 1"),
    (dict(prompts=[[1, 2]], max_new_tokens=2.5), r"max_new_tokens=2.5"),
    (dict(prompts=[[1] * 60], max_new_tokens=5), r"prompt length 60 \+ max_new_tokens 5 = 65 exceeds the context "
                                                   r"n_positions=64"),
    (dict(prompts=[[1], []], max_new_tokens=2), r"prompt 1 is empty"),
    (dict(prompts=[], max_new_tokens=2), r"non-empty list of token-id lists"),
    (dict(prompts="hello", max_new_tokens=2), r"non-empty list of token-id lists"),
    (dict(prompts=[[1, 97]], max_new_tokens=2), r"prompt 0: token id 97 is outside \[0, 97\)"),
    (dict(prompts=[[1, -1]], max_new_tokens=2), r"token id -1 is outside"),
    (dict(prompts=[[1, 2.0]], max_new_tokens=2), r"token 2.0 is not an integer"),
    (dict(prompts=[[1]], max_new_tokens=2, sampling=SamplingParams(top_k=98)),
     r"top_k=98 must be an integer in \[1, 97\] \(the vocabulary size\)"),
    (dict(prompts=[[1]], max_new_tokens=2, sampling=SamplingParams(stop_tokens=[100])),
     r"stop_tokens: token id 100 is outside \[0, 97\)"),
    (dict(prompts=[[1]], max_new_tokens=2, sampling=SamplingParams(logit_bias={97: 1})),
     r"logit_bias: token id 97 is outside \[0, 97\)"),
    (dict(prompts=[[1]], max_new_tokens=2,
          sampling=dict(top_k=5)), r"sampling must be a gptjax.SamplingParams, got dict"),
]
BAD_SAMPLING = [  # refused when the SamplingParams is built, before any backend sees it
    (dict(temperature=-0.1), r"temperature=-0.1 must be a finite number >= 0"),
    (dict(temperature=float("inf")), r"temperature=inf must be a finite number >= 0"),
    (dict(temperature=10**400), r"temperature=1000000.* must be a finite number >= 0"),  # was an OverflowError
    (dict(presence_penalty=-10**400), r"presence_penalty=-1000000.* must be a finite number in \[-2, 2\]"),
    (dict(top_p=0.0), r"top_p=0.0 must be a number in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5"),
    (dict(top_k=0), r"top_k=0 must be an integer >= 1"),
    (dict(top_k=2.0), r"top_k=2.0 must be an integer >= 1"),
    (dict(stop_tokens=[-1]), r"stop_tokens: -1 is not a token id"),
    (dict(stop_tokens="ab"), r"stop_tokens must be a list of token ids, got str"),
    (dict(seed=-1), r"seed=-1 must be an integer in \[0, 2\*\*32\)"),
    (dict(greedy=1), r"greedy=1 must be True or False"),
]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("kwargs,pattern", BAD)
def test_bad_generate_input_fails_before_compiling(name, kwargs, pattern):
    backend = get_backend(name, CONFIG)
    before = (jax_decode.prefill._cache_size(), jax_decode.decode._cache_size())
    with pytest.raises(GptjaxError, match=pattern):
        backend.generate(PARAMS, **kwargs)
    with pytest.raises(GptjaxError, match=pattern):
        backend.stream(PARAMS, **kwargs)  # raised on the call, not on the first next()
    assert (jax_decode.prefill._cache_size(), jax_decode.decode._cache_size()) == before


@pytest.mark.parametrize("kwargs,pattern", BAD_SAMPLING)
def test_bad_sampling_params_are_refused_when_built(kwargs, pattern):
    with pytest.raises(GptjaxError, match=pattern):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("name", BACKENDS)
def test_the_old_sampling_keywords_warn_and_still_work_for_one_release(name):
    backend = get_backend(name, CONFIG)
    with pytest.warns(DeprecationWarning, match=r"write generate\(\.\.\., sampling=gptjax.SamplingParams\("
                                                r"temperature=0.7, seed=3\)\)"):
        old = backend.generate(PARAMS, PROMPTS, 6, temperature=0.7, seed=3)
    assert old.tokens == backend.generate(PARAMS, PROMPTS, 6, sampling=SamplingParams(temperature=0.7, seed=3)).tokens
    with pytest.warns(DeprecationWarning, match=r"stream\(greedy=True\) is deprecated"):
        backend.stream(PARAMS, PROMPTS, 6, greedy=True)
    with pytest.raises(GptjaxError, match=r"give sampling=SamplingParams\(\.\.\.\) or the keywords seed=1, not both"):
        backend.generate(PARAMS, PROMPTS, 6, sampling=GREEDY, seed=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        backend.generate(PARAMS, PROMPTS, 6, temprature=0.5)


def test_bad_chunk_size():
    with pytest.raises(GptjaxError, match="chunk_size=0 must be an integer >= 1"):
        get_backend("jax", CONFIG).stream(PARAMS, [[1]], 3, chunk_size=0)


# ---- regressions found in review ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
def test_a_tiny_temperature_is_nearly_greedy_not_nan(name):
    backend = get_backend(name, CONFIG)
    assert backend.generate(PARAMS, PROMPTS, 6, sampling=SamplingParams(temperature=1e-12)).tokens == \
        backend.generate(PARAMS, PROMPTS, 6, sampling=GREEDY).tokens


def test_numpy_scalar_arguments_and_non_finite_ones():
    backend = get_backend("jax", CONFIG)
    a = backend.generate(PARAMS, PROMPTS, 4, sampling=SamplingParams(
        temperature=np.float32(0.5), top_p=np.float64(0.9), top_k=np.int64(20), seed=np.int64(3)))
    assert a.tokens == backend.generate(PARAMS, PROMPTS, 4,
                                        sampling=SamplingParams(temperature=0.5, top_p=0.9, top_k=20, seed=3)).tokens
    assert len(list(backend.stream(PARAMS, PROMPTS, 4, chunk_size=np.int64(2)))) == 3
    with pytest.raises(GptjaxError, match="temperature=inf must be a finite number"):
        backend.generate(PARAMS, PROMPTS, 4, sampling=SamplingParams(temperature=float("inf")))


def test_stop_token_counts_share_a_compilation():
    config = GPTConfig(vocab_size=64, n_positions=128, n_layer=1, n_head=2, n_embd=16)
    backend, weights = get_backend("jax", config), get_backend("jax", config).prepare(_params(config, 8))
    backend.generate(weights, [[1] * 3], 5, sampling=SamplingParams(stop_tokens=[1]))
    before = (jax_decode.prefill._cache_size(), jax_decode.decode._cache_size())
    for stops in ([1, 2], [1, 2, 3], list(range(8))):
        backend.generate(weights, [[1] * 3], 5, sampling=SamplingParams(stop_tokens=stops))
    assert (jax_decode.prefill._cache_size(), jax_decode.decode._cache_size()) == before
