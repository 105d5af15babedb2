"""The oracle's attention weights (return_attention), gptjax/attention_maps.py, `gptjax attention`, and the docs'
self-attention code map and picture (docs/model.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from gptjax import attention_maps, get_preset, init_params
from gptjax.backends import numpy_ref
from gptjax.cli import main
from gptjax.errors import GptjaxError

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "trained_byte_tiny"
MODEL_MD = ROOT / "docs" / "model.md"
DATA = ROOT / "benchmarks" / "results" / "attention-trained_byte_tiny.jsonl"


@pytest.fixture(scope="module")
def tiny():
    config = get_preset("tiny")
    return config, init_params(config, seed=3)


def _forward(config, params, tokens, **kw):
    return numpy_ref.gpt2(tokens, params, config.n_layer, config.n_head, config.layer_norm_epsilon, False, **kw)


def test_return_attention_keeps_the_logits_bit_for_bit(tiny):
    config, params = tiny
    tokens = np.array([[1, 5, 9, 2, 7], [3, 3, 8, 0, 4]])
    plain = _forward(config, params, tokens)
    logits, maps = _forward(config, params, tokens, return_attention=True)
    assert np.array_equal(plain, logits)
    assert maps.shape == (config.n_layer, 2, config.n_head, 5, 5)  # [L, B, H, T, S]


def test_rows_sum_to_one_and_nothing_is_seen_ahead(tiny):
    config, params = tiny
    maps = attention_maps.compute(params, config, [4, 8, 15, 16, 23, 42])  # [L, H, T, T]
    assert maps.shape == (config.n_layer, config.n_head, 6, 6)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-12)
    assert np.all(np.triu(maps, k=1) == 0)  # causal: exp(-1e10 - max) underflows to exactly 0
    assert np.all(maps[..., 0, 0] == 1.0)  # the first token can only look at itself


def test_one_head_recomputed_by_hand(tiny):
    config, params = tiny
    tokens = [2, 7, 1, 8]
    p = {k: v.astype(np.float64) for k, v in params.items()}
    x = p["wte.weight"][tokens] + p["wpe.weight"][np.arange(4)]  # [T, D]
    x = numpy_ref.layer_norm(x, p["h.0.ln_1.weight"], p["h.0.ln_1.bias"], config.layer_norm_epsilon)
    qkv = x @ p["h.0.attn.c_attn.weight"] + p["h.0.attn.c_attn.bias"]  # [T, 3D]
    D, K = config.n_embd, config.n_embd // config.n_head
    q, k = qkv[:, :K], qkv[:, D:D + K]  # head 0's queries and keys [T, K]
    scores = q @ k.T / np.sqrt(K) + np.triu(np.full((4, 4), -np.inf), k=1)
    expected = np.exp(scores - scores.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(attention_maps.compute(params, config, tokens)[0, 0], expected, atol=1e-12)


def test_the_jax_model_attends_with_the_same_weights(tiny):
    """The JAX model's own scores and softmax (model.attend), read out by attending over one-hot values: with
    v[s] = e_s the weighted sum of the values is the row of weights itself."""
    import jax.numpy as jnp

    from gptjax.backends.jax.kv import LayerKV
    from gptjax.backends.jax.model import GPT, attend

    config, params = tiny
    tokens = [4, 8, 15, 16, 23, 42]
    T = len(tokens)
    model = GPT(config, params)
    x = model.wte(jnp.array([tokens])) + model.wpe[...][:T]  # [1, T, D]
    one_hot = jnp.broadcast_to(jnp.eye(T), (1, config.n_head, T, T))  # values [B, H, S, S]
    causal = jnp.tril(jnp.ones((1, T, T), dtype=bool))
    weights = []
    for block in model.layers():
        q, k, _ = block.attn.qkv(block.ln_1(x))  # [1, H, T, K]
        weights.append(attend(q, [(LayerKV(k, one_hot), causal)])[0].transpose(1, 0, 2))  # [T, H, S] -> [H, T, S]
        x = block(x)
    np.testing.assert_allclose(np.stack(weights), attention_maps.compute(params, config, tokens), atol=2e-6)


def test_the_trained_fixture_gives_maps_and_labels():
    maps = attention_maps.from_checkpoint(FIXTURE, "ab\ncd é")
    assert maps.tokens == tuple("ab\ncd é".encode())
    assert maps.labels == ("a", "b", "\u21b5", "c", "d", "\u2423", "xc3", "xa9")
    assert maps.weights.shape == (2, 4, 8, 8) and np.isfinite(maps.weights).all()
    again = attention_maps.from_row(json.loads(json.dumps(attention_maps.to_row(maps))))
    np.testing.assert_allclose(again.weights, maps.weights, atol=0.5e-4)


@pytest.mark.parametrize(("prompt", "message"), [("", "--prompt is empty"), ("x" * 65, "context is 64")])
def test_bad_prompts_are_named(prompt, message):
    with pytest.raises(GptjaxError, match=message):
        attention_maps.from_checkpoint(FIXTURE, prompt)


def test_cli_writes_the_picture_and_the_json(tmp_path, capsys):
    png, data = tmp_path / "maps.png", tmp_path / "maps.jsonl"
    assert main(["attention", "--checkpoint", str(FIXTURE), "--prompt", "def f(x):", "--out", str(png),
                 "--json", str(data)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    env, row = (json.loads(line) for line in data.read_text().splitlines())
    assert env["kind"] == "environment" and env["env"]["git"] and env["data_hash"] == attention_maps.data_hash(row)
    assert row["tokens"] == list(b"def f(x):") and np.asarray(row["weights"]).shape == (2, 4, 9, 9)
    assert "2 layers x 4 heads over 9 tokens" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["--checkpoint", "no/such/dir", "--prompt", "hi"], "checkpoint 'no/such/dir' does not exist"),
    (["--checkpoint", str(FIXTURE), "--prompt", ""], "--prompt is empty"),
])
def test_cli_bad_input_is_a_clear_error(tmp_path, capsys, argv, message):
    assert main(["attention", *argv, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptjax attention: error: ") and message in err
    assert not (tmp_path / "x.png").exists()


def test_the_help_names_real_checkpoint_paths(capsys):
    with pytest.raises(SystemExit):
        main(["attention", "--help"])
    out = capsys.readouterr().out
    assert "runs/<timestamp>/model" in out and "tests/fixtures/trained_byte_tiny" in out


# ---- docs/model.md: the code map quotes the lines it links, the picture is drawn from the committed data ------
CODE_REF = re.compile(r"\[[\w./]+:(\d+)\]\(\.\./([\w/.]+)#L(\d+)\) `([^`]+)`")


def test_the_code_map_quotes_the_lines_it_links():
    refs = CODE_REF.findall(MODEL_MD.read_text(encoding="utf-8"))
    assert len(refs) >= 16  # every symbol, in both backends
    for shown, path, line, code in refs:
        lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
        now = [i + 1 for i, text in enumerate(lines) if code in text]
        assert shown == line, f"{path}: the link says L{line} but the label says {shown}"
        assert code in lines[int(line) - 1], (f"docs/model.md's code map: {path}:{line} no longer holds `{code}`"
                                              f" (now at line(s) {now or 'none: the code changed'}; where it "
                                              "moved, `PYTHONPATH=. python tests/test_attention_maps.py` relinks it)")


def relink_code_map() -> list[str]:
    """Point each code-map link whose quoted code moved to the one line that now holds it; what it changed."""
    text, changed = MODEL_MD.read_text(encoding="utf-8"), []
    for m in CODE_REF.finditer(text):
        _, path, line, code = m.groups()
        lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
        now = [i + 1 for i, t in enumerate(lines) if code in t]
        if code not in lines[int(line) - 1] and len(now) == 1:
            name = path.rsplit("/", 1)[1]
            text = text.replace(m.group(0), f"[{name}:{now[0]}](../{path}#L{now[0]}) `{code}`")
            changed.append(f"{path}: {line} -> {now[0]} `{code}`")
    MODEL_MD.write_text(text, encoding="utf-8")
    return changed


def test_the_picture_in_the_docs_is_drawn_from_the_committed_data():
    env, row = (json.loads(line) for line in DATA.read_text().splitlines())
    name = f"attention-{attention_maps.data_hash(row)}.png"
    assert env["data_hash"] == attention_maps.data_hash(row)
    assert f"(img/{name})" in MODEL_MD.read_text(encoding="utf-8"), f"docs/model.md must show img/{name}"
    assert (ROOT / "docs" / "img" / name).is_file()
    assert row["checkpoint"] == "tests/fixtures/trained_byte_tiny" and repr(row["prompt"]) in MODEL_MD.read_text()


if __name__ == "__main__":  # relink docs/model.md's code map after code moved (review the diff)
    print("\n".join(relink_code_map()) or "every link holds its code")
