"""A server whose warm-up fails exits non-zero (instead of staying up with /health saying `failed`)."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gptjax import init_params, save_checkpoint
from gptjax.config import get_preset

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_a_server_whose_warm_up_fails_exits_non_zero(tmp_path):
    config = get_preset("tiny")
    save_checkpoint(config, init_params(config), tmp_path / "ck")
    proc = subprocess.Popen([sys.executable, str(HERE / "_serve_faulty.py"), str(tmp_path / "ck"),
                             str(_free_port()), "dynamic", "fail-warmup"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=120)  # before the fix: still running (unready) at the timeout
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail("the server kept running after its warm-up failed:\n" + out[-2000:])
    assert proc.returncode == 1, out[-2000:]
    assert "warm-up failed" in out and "injected warm-up failure" in out
