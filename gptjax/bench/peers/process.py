"""The suite's end of a peer process (worker.py): start it, send requests, check each variant before timing it.

One PeerProcess per peer (llama.cpp, ct2, ort), started on first use with the peer's log at DIR/peers/NAME.log.
Each variant is loaded on demand and passes a correctness check before it is timed: its logits for a fixed
sequence against gptjax fp32's (largest difference relative to the largest logit) and the greedy tokens at every
position, within TOLERANCES[variant]; a variant that fails is reported with its numbers and never timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.bench.peers import TOLERANCES
from gptjax.errors import GptjaxError


class PeerProcess:
    """One peer engine's worker process: requests one at a time, a GptjaxError for a failed request."""

    def __init__(self, name: str, checkpoint: str, workdir: Path, threads: int) -> None:
        self.name, self.checkpoint, self.workdir, self.threads = name, checkpoint, workdir, threads
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.loaded: dict[str, dict[str, Any]] = {}  # variant -> its check

    def request(self, op: str, **fields: Any) -> Any:
        """Send one request and wait for its reply's result."""
        if self.proc is None:
            self.proc = self._start()
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise GptjaxError(f"the {self.name} peer process exited with status {self.proc.wait()} "
                              f"(its log: {self.log_path})")
        reply = json.loads(line)
        if "error" in reply:
            raise GptjaxError(f"{self.name}: {reply['error']}")
        return reply["ok"]

    def _start(self) -> subprocess.Popen:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = os.environ | {"OMP_NUM_THREADS": str(self.threads), "JAX_PLATFORMS": "cpu"}
        with open(self.log_path, "a") as log:
            return subprocess.Popen([sys.executable, "-m", "gptjax.bench.peers.worker", self.name], env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)

    def prepare(self, variant: str, tokens: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
        """Load the variant (once) and check it against gptjax's reference logits [T, V] for `tokens` [T]."""
        if variant not in self.loaded:
            load_s = self.request("load", variant=variant, checkpoint=self.checkpoint, threads=self.threads,
                                  workdir=str(self.workdir))
            path = self.request("logits", variant=variant, tokens=tokens.tolist(),
                                out=str(self.workdir / f"{self.name}-{variant}-logits.npy"))
            self.loaded[variant] = check_logits(variant, np.load(path), reference) | {"load_s": load_s}
        return self.loaded[variant]

    def drop(self, variant: str) -> None:
        """Free a variant's engine in the peer process."""
        if self.proc is not None and variant in self.loaded:
            self.request("drop", variant=variant)
            del self.loaded[variant]

    def close(self) -> None:
        """Ask the process to quit and wait for it."""
        if self.proc is not None:
            try:
                self.request("quit")
            except GptjaxError:
                pass
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
            self.proc = None


def check_logits(variant: str, theirs: np.ndarray, ours: np.ndarray) -> dict[str, Any]:
    """The correctness check of a peer's logits [T, V] against gptjax fp32's: the largest difference relative to the
    largest logit, the share of positions whose greedy token agrees, and whether both are within the variant's
    tolerance."""
    if theirs.shape != ours.shape:
        return {"passed": False, "message": f"logits of shape {theirs.shape}, gptjax's {ours.shape}"}
    rel = float(np.abs(theirs - ours).max() / np.abs(ours).max())
    agree = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
    max_rel, min_agree = TOLERANCES[variant]
    passed = rel <= max_rel and agree >= min_agree
    return {"passed": passed, "max_rel_logit_error": rel, "greedy_agreement": agree, "tolerance": [max_rel, min_agree],
            "message": "" if passed else f"logits off by {rel:.2e} of the largest (allowed {max_rel:g}), greedy "
                                         f"agreement {agree:.0%} (needed {min_agree:.0%})"}
