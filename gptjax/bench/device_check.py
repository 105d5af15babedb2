"""`gptjax bench --device-check`: sized for a short accelerator lease. Checks the backend's logits against the
NumPy oracle on the accelerator (fp32 must match; reduced precisions are measured and reported), then runs the
quick suite under a time budget, writing both to one directory."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np

from gptjax import precision as registry
from gptjax.backends import get_backend
from gptjax.bench import suite
from gptjax.bench.report import SCHEMA, write_jsonl
from gptjax.bench.workloads import backend_options
from gptjax.config import get_preset
from gptjax.errors import GptjaxError
from gptjax.sampling import GREEDY
from gptjax.weights import init_params

# max |logits - oracle| / max(1, max |oracle|) allowed (the registry's tolerance); only fp32 decides the exit status
TOLERANCE = {name: m.tolerance for name, m in registry.MODES.items()}


def correctness(preset: str, backend: str = "jax", precision: str = "fp32", batch: int = 2, seq: int = 64
                ) -> dict[str, Any]:
    """Max |backend logits - NumPy fp32 logits| over [batch, seq] random tokens on random weights, relative to
    the logits' scale, against TOLERANCE; argmax and greedy-decode agreement as information (near-ties flip)."""
    import jax  # not at the top: `gptjax bench --help` imports this module, and jax takes half a second

    config = get_preset(preset)
    seq = min(seq, config.n_positions)
    row = {"kind": "check", "preset": preset, "backend": backend, "precision": precision, "batch": batch, "seq": seq,
           "device_kind": jax.devices()[0].device_kind, "platform": jax.default_backend()}
    try:
        ours = get_backend(backend, config, **backend_options(precision, None))
    except GptjaxError as e:
        return row | {"status": "skipped", "message": str(e)}
    params = init_params(config, seed=0)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq))
    oracle = get_backend("numpy", config)
    ref, got = oracle.forward(params, tokens), ours.forward(params, tokens)
    err = float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))
    prompts = tokens[:, :8].tolist()
    a = oracle.generate(params, prompts, 8, sampling=GREEDY).tokens
    b = ours.generate(params, prompts, 8, sampling=GREEDY).tokens
    return row | {"status": "ok", "max_rel_logit_error": err, "tolerance": TOLERANCE[precision],
                  "passed": err <= TOLERANCE[precision],
                  "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
                  "greedy_decode_agreement": float(np.mean(np.asarray(a) == np.asarray(b)))}


def device_check(options: Any, log: Any = print) -> int:
    """Correctness first, then the quick suite within options.time_budget (default 240 s); 0 if fp32 passed."""
    t0 = time.monotonic()
    opts = dataclasses.replace(options, suite="quick", preset=options.preset or "gpt2",
                               out=options.out or time.strftime("runs/device-check-%Y%m%d-%H%M%S"),
                               time_budget=options.time_budget or 240.0)
    os.makedirs(opts.out, exist_ok=True)
    open(os.path.join(opts.out, "check.jsonl"), "w").close()
    passed = True
    for precision in dict.fromkeys(("fp32",) + tuple(opts.precisions)):
        check = {"schema": SCHEMA, "run": "device-check"} | correctness(opts.preset, opts.backend, precision)
        write_jsonl(os.path.join(opts.out, "check.jsonl"), [check])
        log(_describe(check))
        passed = passed and (precision != "fp32" or check.get("passed", False))
    suite.run(dataclasses.replace(opts, time_budget=max(30.0, opts.time_budget - (time.monotonic() - t0))), log)
    log(f"device check done in {time.monotonic() - t0:.0f} s: {'PASS' if passed else 'FAIL'}; {opts.out}")
    return 0 if passed else 1


def _describe(check: dict[str, Any]) -> str:
    where = f"{check['backend']} {check['precision']} on {check['device_kind']} ({check['platform']})"
    if check["status"] != "ok":
        return f"correctness {where}: skipped: {check['message']}"
    verdict = "PASS" if check["passed"] else ("FAIL" if check["precision"] == "fp32" else "outside tolerance")
    return (f"correctness {where}: max relative logit error {check['max_rel_logit_error']:.2e} (tolerance "
            f"{check['tolerance']:.0e}): {verdict}; greedy decode agreement {check['greedy_decode_agreement']:.0%}")
