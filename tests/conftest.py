"""Test setup: 8 host devices for JAX (set before jax is imported anywhere) and shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sysconfig  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
CORPUS_FILES = ("textwrap.py", "bisect.py", "colorsys.py", "keyword.py", "this.py")


def stdlib_corpus(directory: Path, names: tuple[str, ...] = CORPUS_FILES) -> str:
    """A few real Python files (any Python has them) copied into directory: a local training corpus."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in names:
        (directory / name).write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    return str(directory)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """The default local corpus, one per test module."""
    return stdlib_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def hf_tiny_dir() -> Path:
    """A GPT2LMHeadModel saved by transformers' save_pretrained (tiny, random, every param perturbed)."""
    return FIXTURES / "hf_tiny_gpt2"


@pytest.fixture
def golden() -> dict[str, np.ndarray]:
    """input_ids and transformers' float32 logits for hf_tiny_dir."""
    from safetensors.numpy import load_file

    return load_file(str(FIXTURES / "hf_tiny_gpt2_golden.safetensors"))


@pytest.fixture
def decode_hlo(monkeypatch):
    """decode_hlo(generate) runs generate() and returns the optimised HLO text of the jitted decode loop it used
    (compiled from the same arguments before the call donates them)."""
    from gptjax.backends.jax import decode as jax_decode

    def run(generate) -> str:
        real, hlo = jax_decode.decode, []

        def spy(*args):
            hlo.append(real.lower(*args).compile().as_text())
            return real(*args)

        spy._cache_size = real._cache_size  # the backend counts compilations through it
        monkeypatch.setattr(jax_decode, "decode", spy)
        generate()
        monkeypatch.setattr(jax_decode, "decode", real)
        assert hlo, "generate() never reached the decode loop"
        return hlo[0]

    return run


@pytest.fixture
def failing_generate(monkeypatch):
    """fail(backend, params, error): the backend's generation raises `error` before its first chunk, and
    backend.generate is checked to raise it (what metrics and spans record for a failed request)."""

    def fail(backend, params, error: BaseException) -> None:
        def broken(weights, request, chunk_size):
            yield from []
            raise error

        monkeypatch.setattr(backend, "_generate", broken)
        with pytest.raises(type(error)):
            backend.generate(params, [[1]], 3)

    return fail



@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop every jitted function's compiled executables after each test module. Each executable keeps its own
    memory mappings: the whole suite in one process compiles enough of them to pass the kernel's limit of 65,530
    mappings (vm.max_map_count), and XLA then segfaults in a later compile (seen at test 614 of 737)."""
    yield
    import gc
    import sys

    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
        gc.collect()
