"""`gptjax serve`: an OpenAI-style HTTP server with dynamic batching (needs the `serve` extra: fastapi, uvicorn).

Split as vLLM's OpenAI entrypoints are: protocol.py (request parsing -> SamplingParams and GenerationRequests, the
error object), completions.py (the answer's choices and logprobs), serving.py (the completion pipeline, SSE),
app.py (routes and middleware only), state.py (a server's options, model, readiness and scheduler);
scheduler.py (the batcher's worker thread), continuous.py (continuous batching on a backend's decode session),
connections.py (header timeout, connection cap), server.py (loading a checkpoint, uvicorn with graceful draining
on SIGTERM). The metrics are gptjax.tracing.metrics'.
"""

from gptjax.serve.app import create_app
from gptjax.serve.server import load_model, run
from gptjax.serve.state import ServedModel, ServeOptions

__all__ = ["ServeOptions", "ServedModel", "create_app", "load_model", "run"]
