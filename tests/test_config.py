"""GPTConfig validation, presets and the size calculator against hand-computed numbers."""

import pytest

from gptjax import GPTConfig, GptjaxError, get_preset
from gptjax.config import PRESETS


@pytest.mark.parametrize("name,count", [
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080),
    ("gpt2-xl", 1_557_611_200),
])
def test_gpt2_param_counts_are_exact(name, count):
    assert get_preset(name).num_params() == count


def test_gpt2_shapes():
    assert [(c.n_layer, c.n_head, c.n_embd) for c in map(get_preset, ["gpt2", "gpt2-medium", "gpt2-large",
            "gpt2-xl"])] == [(12, 12, 768), (24, 16, 1024), (36, 20, 1280), (48, 25, 1600)]
    assert {get_preset(n).vocab_size for n in ["gpt2", "gpt2-xl"]} == {50257}
    assert {get_preset(n).n_positions for n in ["gpt2", "gpt2-xl"]} == {1024}


def test_small_presets_sizes():
    assert PRESETS["byte-small"].num_params() == 10_844_160
    assert PRESETS["byte-mini"].num_params() == 3_257_856
    assert PRESETS["tiny"].num_params() == 35_712


def test_param_count_by_hand_for_a_small_shape():
    c = GPTConfig(vocab_size=10, n_positions=4, n_layer=1, n_head=1, n_embd=2)
    # wte 20 + wpe 8 + ln 4+4 + c_attn 12+6 + c_proj 4+2 + c_fc 16+8 + mlp.c_proj 16+2 + ln_f 4
    assert c.num_params() == 20 + 8 + 8 + 18 + 6 + 24 + 18 + 4
    untied = c.replace(tie_word_embeddings=False)
    assert untied.num_params() == c.num_params() + 20


@pytest.mark.parametrize("field,value,needle", [
    ("n_layer", 0, "n_layer=0 must be a positive integer"),
    ("n_head", -3, "n_head=-3 must be a positive integer"),
    ("vocab_size", 2.5, "vocab_size=2.5 must be a positive integer"),
    ("n_embd", True, "n_embd=True must be a positive integer"),
    ("layer_norm_epsilon", 0.0, "layer_norm_epsilon=0.0 must be a float in (0, 1)"),
    ("n_inner", 0, "n_inner=0 must be a positive integer"),
])
def test_validation_names_field_value_and_rule(field, value, needle):
    with pytest.raises(GptjaxError, match=__import__("re").escape(needle)):
        GPTConfig(**{field: value})


def test_heads_must_divide_width():
    with pytest.raises(GptjaxError, match=r"n_embd=100 must be divisible by n_head=3"):
        GPTConfig(n_embd=100, n_head=3)


def test_config_is_frozen_and_replace_validates():
    c = get_preset("tiny")
    with pytest.raises(AttributeError):
        c.n_layer = 3
    assert c.replace(n_layer=3).n_layer == 3
    with pytest.raises(GptjaxError, match="unknown config field"):
        c.replace(n_layers=3)
    with pytest.raises(GptjaxError, match="n_head=5"):
        c.replace(n_head=5)


def test_unknown_preset_lists_known():
    with pytest.raises(GptjaxError, match=r"unknown preset 'gpt3'.*gpt2-medium"):
        get_preset("gpt3")


def test_forward_flops_hand_computed():
    c = GPTConfig(vocab_size=10, n_positions=8, n_layer=2, n_head=1, n_embd=4)
    # per token matmuls: L·(D·3D + D·D + D·4D + 4D·D) = 2·(48+16+64+64) = 384 MACs; head D·V = 40 MACs
    # attention over T=3: 2·L·D·T·(T+1) = 2·2·4·3·4 = 192 FLOPs
    assert c.forward_flops(1, 3) == 2 * 384 * 3 + 2 * 40 * 3 + 192
    assert c.forward_flops(5, 3, last_only=True) == 5 * (2 * 384 * 3 + 2 * 40 + 192)
    assert c.forward_flops_per_token(3) == (2 * 384 * 3 + 2 * 40 * 3 + 192) / 3
    assert c.train_flops_per_token(3) == 3 * c.forward_flops_per_token(3)


def test_gpt2_training_flops_match_the_6n_rule_of_thumb():
    c = get_preset("gpt2")
    n_mm = c.matmul_params()
    assert c.train_flops_per_token(1024) == pytest.approx(6 * n_mm + 6 * 12 * 768 * 1025)


def test_weight_and_kv_bytes():
    c = get_preset("gpt2")
    assert c.weight_bytes("fp32") == 4 * 124_439_808
    assert c.weight_bytes("bf16") == 2 * 124_439_808
    D, L, V = 768, 12, 50257
    int8_values = L * 12 * D * D + V * D
    scales = L * (3 * D + D + 4 * D + D) + V
    rest = 124_439_808 - int8_values
    assert c.weight_bytes("int8") == int8_values + 4 * (scales + rest)
    assert c.weight_bytes("int8") / c.weight_bytes("fp32") < 0.27
    assert c.kv_cache_bytes_per_token("fp32") == 2 * L * D * 4
    assert c.kv_cache_bytes_per_token("bf16") == 2 * L * D * 2
    assert c.kv_cache_bytes_per_token("int8") == 2 * L * D + 2 * L * 12 * 4
    with pytest.raises(GptjaxError, match="precision='fp16'; allowed: fp32, bf16, int8"):
        c.weight_bytes("fp16")


def test_hf_dict_round_trip_and_refusals():
    c = GPTConfig(vocab_size=97, n_positions=40, n_layer=2, n_head=4, n_embd=32, n_inner=64)
    assert GPTConfig.from_hf_dict(c.to_hf_dict()) == c
    with pytest.raises(GptjaxError, match="model_type='llama'"):
        GPTConfig.from_hf_dict({"model_type": "llama"})
    with pytest.raises(GptjaxError, match="activation_function='relu'"):
        GPTConfig.from_hf_dict({"activation_function": "relu"})
    with pytest.raises(GptjaxError, match="scale_attn_by_inverse_layer_idx=True"):
        GPTConfig.from_hf_dict({"scale_attn_by_inverse_layer_idx": True})


def test_flops_reject_bad_sizes():
    c = get_preset("tiny")
    with pytest.raises(GptjaxError, match="seq_len=0 must be a positive integer"):
        c.forward_flops_per_token(0)
    with pytest.raises(GptjaxError, match="batch=-1 must be a positive integer"):
        c.forward_flops(-1, 8)
    with pytest.raises(GptjaxError, match="seq_len=2.5"):
        c.forward_flops(1, 2.5)


def test_the_size_table_takes_weight_storages_and_kv_caches_from_the_registry(monkeypatch):
    # a weight storage without a KV-cache counterpart (a new mode, say fp16) once broke `gptjax info`: its KV
    # rows iterated the weight storages
    from gptjax import precision, sizes

    monkeypatch.setitem(precision.STORAGES, "fp16", precision.Storage("fp16", "float16", 2))
    table = sizes.size_table([("tiny", get_preset("tiny"))])
    assert "| weights fp16 | " in table and "KV cache per token fp16" not in table
    assert all(f"KV cache per token {k} |" in table for k in precision.KV_CACHES)


@pytest.mark.parametrize("content", [b"[" * 100_000 + b"]" * 100_000, b'{"n_layer": 1' + b"0" * 5000 + b"}"])
def test_a_hostile_config_file_names_the_file(tmp_path, content):
    (tmp_path / "config.json").write_bytes(content)  # before: RecursionError / ValueError (int digit limit)
    with pytest.raises(GptjaxError, match=r"config.json is not valid JSON"):
        GPTConfig.from_json_file(str(tmp_path / "config.json"))
