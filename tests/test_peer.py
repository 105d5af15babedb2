"""Interop with transformers itself; runs only where the `peer` extra (torch + transformers) is installed."""

import numpy as np
import pytest

from gptjax import GPTConfig, get_backend, init_params, save_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("tied", [True, False])
def test_saved_checkpoint_loads_unchanged_in_transformers(tmp_path, tied):
    config = GPTConfig(vocab_size=71, n_positions=24, n_layer=2, n_head=2, n_embd=16, tie_word_embeddings=tied)
    rng = np.random.default_rng(0)
    params = {k: v + rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in init_params(config).items()}
    save_checkpoint(config, params, tmp_path / "ck")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ck").eval()
    tokens = rng.integers(0, config.vocab_size, (2, 11))
    with torch.no_grad():
        theirs = model(torch.from_numpy(tokens)).logits.numpy()
    ours = get_backend("numpy", config).forward(params, tokens)
    assert np.abs(theirs - ours).max() <= 1e-4
