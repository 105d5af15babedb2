"""`gptjax bench --device-check`: sized for a short accelerator lease. Checks the backend's logits against the
NumPy oracle on the accelerator, then runs the quick suite under a time budget, writing both to one directory."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np

from gptjax.bench.report import SCHEMA, write_jsonl
from gptjax.config import get_preset


def correctness(preset: str, backend: str = "jax", batch: int = 2, seq: int = 64, tol: float = 1e-3
                ) -> dict[str, Any]:
    """Max |backend logits - NumPy logits| over [batch, seq] random tokens on random weights, relative to the
    logits' scale, and whether it is within tol; greedy decode agreement as information (near-ties flip)."""
    import jax

    from gptjax.backends import get_backend
    from gptjax.weights import init_params

    config = get_preset(preset)
    seq = min(seq, config.n_positions)
    params = init_params(config, seed=0)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq))
    ref = get_backend("numpy", config).forward(params, tokens)
    got = get_backend(backend, config).forward(params, tokens)
    err = float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))
    prompts = tokens[:, :8].tolist()
    a = get_backend("numpy", config).generate(params, prompts, 8, greedy=True).tokens
    b = get_backend(backend, config).generate(params, prompts, 8, greedy=True).tokens
    return {"kind": "check", "preset": preset, "backend": backend, "device_kind": jax.devices()[0].device_kind,
            "platform": jax.default_backend(), "batch": batch, "seq": seq, "max_rel_logit_error": err,
            "tolerance": tol, "passed": err <= tol,
            "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
            "greedy_decode_agreement": float(np.mean(np.asarray(a) == np.asarray(b)))}


def device_check(options: Any, log: Any = print) -> int:
    """Correctness first, then the quick suite within options.time_budget (default 240 s); 0 if the check passed."""
    from gptjax.bench import suite

    t0 = time.monotonic()
    opts = dataclasses.replace(options, suite="quick", preset=options.preset or "gpt2",
                               out=options.out or time.strftime("runs/device-check-%Y%m%d-%H%M%S"),
                               time_budget=options.time_budget or 240.0)
    os.makedirs(opts.out, exist_ok=True)
    check = {"schema": SCHEMA, "run": "device-check"} | correctness(opts.preset, opts.backend)
    write_jsonl(os.path.join(opts.out, "check.jsonl"), [check])
    log(f"correctness on {check['device_kind']} ({check['platform']}): max relative logit error "
        f"{check['max_rel_logit_error']:.2e} (tolerance {check['tolerance']:.0e}): "
        f"{'PASS' if check['passed'] else 'FAIL'}; greedy decode agreement {check['greedy_decode_agreement']:.0%}")
    suite.run(dataclasses.replace(opts, time_budget=max(30.0, opts.time_budget - (time.monotonic() - t0))), log)
    log(f"device check done in {time.monotonic() - t0:.0f} s: {opts.out}")
    return 0 if check["passed"] else 1
