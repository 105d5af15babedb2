"""lm-evaluation-harness (the `eval` extra) against `gptjax serve` started here: model `local-completions` with
the server's remote tokenizer (/tokenizer_info, /tokenize, /detokenize), two tiny local tasks committed under
tests/fixtures/lm_eval (a loglikelihood multiple-choice task, a generate_until task stopping on
multi-character strings), no download. The log-likelihoods lm-eval reports equal backend.score's on the same
text, and its generations equal backend.generate's greedy tokens cut at the first stop string."""

from pathlib import Path

import pytest
from test_serve import CONFIG, PARAMS, Server, _env

from gptjax import save_checkpoint
from gptjax.backends import get_backend
from gptjax.sampling import GREEDY
from gptjax.tokenizer import ByteTokenizer

pytestmark = pytest.mark.integration
TASKS = Path(__file__).parent / "fixtures" / "lm_eval"
MODEL = "tiny-ck"
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm_eval") / MODEL
    save_checkpoint(CONFIG, PARAMS, path)
    server = Server(lambda port: ["-m", "gptjax.cli", "serve", "--checkpoint", str(path), "--port", str(port)],
                    _env(), path.parent / "server.log")
    yield server
    assert server.stop() == 0, server.log.read_text()


def _evaluate(server, monkeypatch, tmp_path):
    """simple_evaluate on both tasks, offline (the tasks' relative data paths resolve from their directory)."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.chdir(TASKS)
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = {"model": MODEL, "base_url": server.url + "/v1/completions", "tokenizer_backend": "remote",
            "max_length": CONFIG.n_positions, "batch_size": 4, "max_retries": 1, "timeout": 60}
    return lm_eval.simple_evaluate(model="local-completions", model_args=args,
                                   tasks=["gptjax_tiny_mc", "gptjax_tiny_gen"], limit=4, log_samples=True,
                                   task_manager=TaskManager(include_path=str(TASKS)))


def test_lm_eval_loglikelihoods_and_generations_equal_the_backends(server, monkeypatch, tmp_path):
    results = _evaluate(server, monkeypatch, tmp_path)
    backend = get_backend("jax", CONFIG)
    samples = results["samples"]["gptjax_tiny_mc"]
    assert len(samples) == 4
    for sample in samples:
        assert len(sample["arguments"]) == len(sample["doc"]["choices"])
        for (context, continuation), (loglikelihood, greedy) in zip(sample["arguments"], sample["filtered_resps"]):
            ctx, cont = TOK.encode(context), TOK.encode(continuation)
            scores = backend.score(PARAMS, [ctx + cont], top_k=1)[0]
            assert loglikelihood == pytest.approx(scores.total(len(ctx)), abs=1e-4)  # float32 sums: ulps apart
            assert greedy == scores.greedy(len(ctx))
    accuracy = sum(s["acc"] for s in samples) / 4
    assert results["results"]["gptjax_tiny_mc"]["acc,none"] == pytest.approx(accuracy)
    stops = ["\n\n", "Question:", "\a\a"]
    generations = results["samples"]["gptjax_tiny_gen"]
    assert len(generations) == 3
    cut = 0
    for sample in generations:
        prompt = TOK.encode(sample["arguments"][0][0])
        text = TOK.decode(backend.generate(PARAMS, [prompt], 12, sampling=GREEDY).tokens[0])
        ends = [text.find(s) for s in stops if s in text]
        cut += bool(ends)
        assert sample["filtered_resps"][0] == text[:min(ends, default=len(text))]
    assert cut >= 1  # at least one generation really ended on a multi-character stop string


def test_the_lm_eval_study_refuses_a_missing_checkpoint(capsys, tmp_path):
    from gptjax.cli import main

    assert main(["bench", "--out", str(tmp_path / "x"), "--study", "lm-eval", "--checkpoint", str(tmp_path)]) == 2
    assert "give a checkpoint directory (e.g. runs/<time>/model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
