"""Test setup: 8 host devices for JAX (set before jax is imported anywhere), the needs_kernels marker, and shared
fixtures and helpers (test modules import the helpers: `from conftest import needs_kernels, wait_until`)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import subprocess  # noqa: E402
import sysconfig  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
CORPUS_FILES = ("textwrap.py", "bisect.py", "colorsys.py", "keyword.py", "this.py")

# 1: the CPU kernels must run here (.ci/run sets it where /proc/cpuinfo has AVX512 VNNI and BF16), so a broken
# kernel build fails the run instead of skipping the kernel tests
REQUIRE_KERNELS = "GPTJAX_REQUIRE_KERNELS"
needs_kernels = pytest.mark.needs_kernels  # @needs_kernels: the test runs gptjax's CPU kernels


def pytest_configure(config: pytest.Config) -> None:
    """Register needs_kernels (pyproject's --strict-markers refuses unknown markers)."""
    config.addinivalue_line("markers", f"needs_kernels: runs gptjax's CPU kernels; skipped where they cannot run, "
                            f"a failure where {REQUIRE_KERNELS}=1")


def _kernels_missing() -> str | None:
    """Why the CPU kernels cannot run in this process, or None when they can."""
    from gptjax.backends import cpu_kernels  # imports jax: only once a test session asks

    return None if cpu_kernels.available() else f"gptjax's CPU kernels cannot run: {cpu_kernels.status()}"


def pytest_sessionstart(session: pytest.Session) -> None:
    """With GPTJAX_REQUIRE_KERNELS=1, stop before the first test when the kernels cannot run."""
    if os.environ.get(REQUIRE_KERNELS) == "1" and (reason := _kernels_missing()):
        pytest.exit(f"{reason}; {REQUIRE_KERNELS}=1 says they must run on this machine (unset it to skip the "
                    "kernel tests instead)", returncode=pytest.ExitCode.USAGE_ERROR)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip a needs_kernels test where the kernels cannot run; fail it instead with GPTJAX_REQUIRE_KERNELS=1."""
    if item.get_closest_marker("needs_kernels") and (reason := _kernels_missing()):
        if os.environ.get(REQUIRE_KERNELS) == "1":
            pytest.fail(f"{reason} ({REQUIRE_KERNELS}=1)", pytrace=False)
        pytest.skip(reason)


def wait_until(condition: Callable[[], object], what: str, timeout: float = 30.0, *,
               process: subprocess.Popen | None = None, poll: float = 0.02) -> None:
    """Poll condition() every `poll` seconds until it holds, failing with `what` after `timeout` seconds (or as
    soon as `process` exits): tests wait for a state, never for a guessed time."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None:
            assert process.poll() is None, f"the process exited (status {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(poll)


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
