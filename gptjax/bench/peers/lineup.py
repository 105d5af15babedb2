"""The peers of one `gptjax bench` run: the checkpoint they all load (gptjax's save of the run's weights), their
processes, each variant's correctness check, and the timed cells each offers for a measurement group."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.bench.peers import VARIANTS, variants, width
from gptjax.bench.peers.process import PeerProcess, check_logits
from gptjax.bench.workloads import Shape, token_batches
from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.timing import timed
from gptjax.weights import save_checkpoint

CHECK_TOKENS = 32  # the fixed sequence every variant's logits are checked on


@dataclass
class PeerCell:
    """One peer variant's timed calls for a group: call(i) and, for decode, the prompt alone (one new token)."""

    backend: str
    variant: str
    call: Callable[[int], float]  # seconds of call i
    prompt: Callable[[int], float] | None = None
    latencies: Callable[[], dict[str, Any]] | None = None
    fields: dict[str, Any] = field(default_factory=dict)


class Lineup:
    """The peers named by --peer for one run; cells(shape, modes) gives each variant's cell after its check."""

    def __init__(self, names: tuple[str, ...], config: GPTConfig, params: dict, out: str, threads: int) -> None:
        self.names, self.config, self.params, self.threads = names, config, params, threads
        self.dir = Path(out) / "peers"
        self.checkpoint = self.dir / "checkpoint"
        self.processes: dict[str, PeerProcess] = {}
        self.checks: dict[tuple[str, str], dict[str, Any]] = {}
        self.tokens = token_batches(config, 1, min(CHECK_TOKENS, config.n_positions), seed=1)[0][0]
        self._reference: np.ndarray | None = None
        self._about: dict[str, dict[str, Any]] = {}

    def _process(self, name: str) -> PeerProcess:
        if name not in self.processes:
            if not self.checkpoint.is_dir():
                save_checkpoint(self.config, self.params, self.checkpoint)
            self.processes[name] = PeerProcess(name, str(self.checkpoint), self.dir, self.threads)
        return self.processes[name]

    def reference(self) -> np.ndarray:
        """gptjax fp32's logits [T, V] for the check tokens (the jax backend)."""
        if self._reference is None:
            from gptjax.backends import get_backend

            backend = get_backend("jax", self.config)
            self._reference = np.asarray(backend.forward(backend.prepare(self.params), self.tokens[None]))[0]
        return self._reference

    def about(self, name: str) -> dict[str, Any]:
        """A peer's version, build and mode mapping (asked once)."""
        if name not in self._about:
            found = self._hf_about() if name == "hf" else self._process(name).request("about")
            self._about[name] = found | {"variants": {f"{bits}-bit" if bits < 32 else "fp32": list(v)
                                                      for bits, v in VARIANTS[name].items()}, "threads": self.threads}
        return self._about[name]

    def _hf_about(self) -> dict[str, Any]:
        from gptjax.bench.peers.hf import about

        return about()

    def cells(self, shape: Shape, modes: tuple[str, ...]) -> tuple[list[PeerCell], list[dict[str, Any]]]:
        """Each peer variant of these modes' width that passes its check, as a cell; a row for every variant that
        was refused or failed its check (never timed)."""
        cells, rows = [], []
        for name in self.names:
            if shape.workload == "train" and name != "hf":
                continue  # only the HF peer trains
            for variant in variants(name, modes[0]):
                try:
                    cells.append(self._cell(name, variant, shape, modes))
                except GptjaxError as e:
                    rows.append({"backend": name, "precision": variant, "status": "skipped", "message": str(e),
                                 "peer": {"name": name, "variant": variant, "maps": _maps(modes, variant)}})
                except _Failed as e:
                    rows.append({"backend": name, "precision": variant, "status": "failed_check",
                                 "message": e.check["message"], "peer": self._fields(name, variant, modes)})
        return cells, rows

    def _fields(self, name: str, variant: str, modes: tuple[str, ...]) -> dict[str, Any]:
        return self.about(name) | {"name": name, "variant": variant, "maps": _maps(modes, variant),
                                   "check": self.checks.get((name, variant))}

    def _cell(self, name: str, variant: str, shape: Shape, modes: tuple[str, ...]) -> PeerCell:
        check = self._check(name, variant)
        if not check["passed"]:
            raise _Failed(check)
        fields = {"peer": self._fields(name, variant, modes)}
        if name == "hf":
            return self._hf_cell(variant, shape, fields)
        proc, key = self._process(name), f"{variant} {shape.workload} {shape.label}"
        length = shape.seq if shape.workload == "prefill" else shape.prompt
        proc.request("job", key=key, variant=variant, workload=shape.workload, batch=shape.batch, length=length,
                     new=shape.new or 0)
        prompt = None
        if shape.workload == "decode":
            proc.request("job", key=key + " prompt", variant=variant, workload="decode", batch=shape.batch,
                         length=length, new=1)
            prompt = lambda i: proc.request("run", key=key + " prompt", i=i)  # noqa: E731
        return PeerCell(name, variant, lambda i: proc.request("run", key=key, i=i), prompt, fields=fields)

    def _check(self, name: str, variant: str) -> dict[str, Any]:
        if (name, variant) not in self.checks:
            if name == "hf":
                from gptjax.bench.peers.hf import logits

                found = check_logits(variant, logits(self.params, self.config, variant, self.tokens),
                                     self.reference())
            else:
                found = self._process(name).prepare(variant, self.tokens, self.reference())
            self.checks[(name, variant)] = found
        return self.checks[(name, variant)]

    def _hf_cell(self, variant: str, shape: Shape, fields: dict[str, Any]) -> PeerCell:
        from gptjax.bench.peers.hf import peer_job

        call, latencies = peer_job(self.params, self.config, shape, variant, self.threads)
        prompt = None
        if shape.workload == "decode":
            first = peer_job(self.params, self.config, dataclasses.replace(shape, new=1), variant, self.threads)[0]
            prompt = lambda i: timed(lambda: first(i))  # noqa: E731
        return PeerCell("hf", variant, lambda i: timed(lambda: call(i)), prompt, latencies, fields)

    def release(self, precision: str) -> None:
        """Free the peers' variants of this mode's width (the groups of that width are done)."""
        for name, proc in self.processes.items():
            for variant in VARIANTS[name].get(width(precision), ()):
                proc.drop(variant)

    def close(self) -> None:
        """End every peer process."""
        for proc in self.processes.values():
            proc.close()


def _maps(modes: tuple[str, ...], variant: str) -> str:
    """The mode mapping of a variant: "int8/w8a8 -> q8_0"."""
    return f"{'/'.join(modes)} -> {variant}"


class _Failed(Exception):
    """A variant failed its correctness check."""

    def __init__(self, check: dict[str, Any]) -> None:
        super().__init__(check["message"])
        self.check = check

