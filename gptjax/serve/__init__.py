"""`gptjax serve`: an OpenAI-style HTTP server with dynamic batching (needs the `serve` extra: fastapi, uvicorn).

app.py (routes, errors, SSE), validation.py (request checks), scheduler.py (the batcher's worker thread),
server.py (loading a checkpoint, uvicorn with graceful draining on SIGTERM).
"""

from gptjax.serve.app import ServedModel, ServeOptions, create_app
from gptjax.serve.server import load_model, run

__all__ = ["ServeOptions", "ServedModel", "create_app", "load_model", "run"]
