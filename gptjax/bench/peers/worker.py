"""A peer engine in its own process: `python -m gptjax.bench.peers.worker NAME` reads one JSON request per line
on stdin and answers one JSON line each on the stream that was its stdout (fd 1 is pointed at stderr first, so
whatever the engine's C++ prints never mixes into the replies). process.PeerProcess is the other end.

An engine module (llama_cpp, ct2, ort) has about() -> {version, build} and load(checkpoint, variant, threads,
workdir) -> an engine with logits(tokens [T]) -> [T, V], prefill(tokens [B, T]) (the last position's logits) and
generate(prompts [B, P], new) -> [B, new] greedy tokens. Calls are timed here, so a reply's pipe costs nothing."""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from gptjax.bench.peers import PROCESS_PEERS
from gptjax.timing import clock
from gptjax.weights import load_config


class Worker:
    """The engines one peer process holds (by variant) and the timed jobs made on them (by key)."""

    def __init__(self, module: Any) -> None:
        self.module, self.engines, self.jobs = module, {}, {}
        self.checkpoint: str | None = None

    def handle(self, request: dict[str, Any]) -> Any:
        """Run one request {"op": NAME, ...fields}; its result."""
        fields = {k: v for k, v in request.items() if k != "op"}
        return getattr(self, "op_" + request["op"])(**fields)

    def op_about(self) -> dict[str, Any]:
        return self.module.about()

    def op_load(self, variant: str, checkpoint: str, threads: int, workdir: str) -> float:
        """Make (or reuse) the variant's model file and load it; the seconds that took."""
        t0, self.checkpoint = clock(), checkpoint
        self.engines[variant] = self.module.load(checkpoint, variant, threads, workdir)
        return clock() - t0

    def op_logits(self, variant: str, tokens: list[int], out: str) -> str:
        """The variant's logits [T, V] for one sequence, saved as .npy at `out`."""
        np.save(out, np.asarray(self.engines[variant].logits(np.asarray(tokens, np.int32)), np.float32))
        return out

    def op_job(self, key: str, variant: str, workload: str, batch: int, length: int, new: int) -> None:
        """Prepare a timed job: prefill of [batch, length] tokens, or decode of `new` tokens after [batch, length]
        prompts; on the same N_INPUTS token batches as gptjax's job of that shape."""
        from gptjax.bench.workloads import N_INPUTS, token_batches

        engine = self.engines[variant]
        inputs = token_batches(load_config(self.checkpoint), batch, length)
        run: Callable[[np.ndarray], Any] = (engine.prefill if workload == "prefill"
                                            else lambda x: engine.generate(x, new))
        self.jobs[key] = (variant, lambda i: run(inputs[i % N_INPUTS]))

    def op_run(self, key: str, i: int) -> float:
        """One call of a job on input i; the seconds it took."""
        t0 = clock()
        self.jobs[key][1](i)
        return clock() - t0

    def op_drop(self, variant: str) -> None:
        """Forget a variant's engine and jobs (frees its weights)."""
        self.jobs = {k: job for k, job in self.jobs.items() if job[0] != variant}
        self.engines.pop(variant, None)
        gc.collect()

    def op_quit(self) -> None:
        return None


def main(argv: list[str] | None = None) -> int:
    """Serve requests until "quit" or the end of stdin."""
    name = (argv if argv is not None else sys.argv[1:])[0]
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the engine's own prints go to stderr (the peer's log file)
    worker = Worker(importlib.import_module(PROCESS_PEERS[name]))
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"ok": worker.handle(request)}
        except Exception as e:  # noqa: BLE001  any engine failure goes back to the suite as a message, not a dead pipe
            reply = {"error": f"{type(e).__name__}: {e}"}
        replies.write(json.dumps(reply) + "\n")
        if request["op"] == "quit":
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
