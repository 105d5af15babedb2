"""A real `gptjax serve` in a subprocess on 127.0.0.1, for the studies that measure through HTTP (serve-load,
lm-eval)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from gptjax.errors import GptjaxError
from gptjax.timing import clock

READY_TIMEOUT_S = 600  # a cold server compiles its first buckets before /health answers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(flags: list[str], port: int, *, quiet: bool = False) -> subprocess.Popen:
    """`gptjax serve FLAGS --host 127.0.0.1 --port PORT` in a subprocess, returned once /health answers 200;
    a GptjaxError (the server killed) if it exits first or is not ready in READY_TIMEOUT_S."""
    import httpx  # optional (the serve-load and lm-eval studies check it is installed)

    cmd = [sys.executable, "-m", "gptjax.cli", "serve", *flags, "--host", "127.0.0.1", "--port", str(port)]
    out = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen(cmd, stdout=out, stderr=out)
    deadline = clock() + READY_TIMEOUT_S
    while clock() < deadline:
        if proc.poll() is not None:
            raise GptjaxError(f"gptjax serve {' '.join(flags)} exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)  # polling a starting server: no event to wait on across processes
    proc.kill()
    raise GptjaxError(f"gptjax serve {' '.join(flags)} not ready in {READY_TIMEOUT_S} s")
