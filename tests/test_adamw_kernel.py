"""The train step's AdamW on gptjax's CPU kernels (gptjax/_kernels/adamw.cc, gptjax.backends.jax.adamw): optax's
update (train.make_optimizer) to float32 rounding, in optax's state, nothing changed by a non-finite step, and
XLA's optax path kept where the parameters live on a mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import needs_kernels

from gptjax.backends import cpu_kernels
from gptjax.backends.jax import adamw
from gptjax.config import GPTConfig
from gptjax.sharding import make_mesh
from gptjax.train import TrainConfig, create_state, decayed, make_optimizer, make_train_step
from gptjax.weights import init_params

CONFIG = GPTConfig(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2)


def _updates(tc: TrainConfig, grad_scale: float, finite: bool = True):
    """Two optimizer steps from the same state and gradients: optax's (XLA) and the kernel's."""
    _, state = create_state(CONFIG, tc, init_params(CONFIG, 0))
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape) * grad_scale, jnp.float32), state.params)
    opt, schedule = make_optimizer(tc)

    def optax_step(p, o, g):
        u, o2 = opt.update(g, o, p)
        return optax.apply_updates(p, u), o2

    def kernel_step(p, o, g):
        norm = optax.tree.norm(g)
        return adamw.fused_update(tc, schedule, g, norm, jnp.asarray(finite) & jnp.isfinite(norm), p, o, decayed(p))

    p1, o1 = jax.jit(optax_step)(state.params, state.opt_state, grads)  # moments not zero for the compared step
    return (p1, o1), jax.jit(optax_step)(p1, o1, grads), jax.jit(kernel_step)(p1, o1, grads)


@needs_kernels
@pytest.mark.parametrize("grad_clip,grad_scale", [(1.0, 0.05), (1.0, 1e-4), (0.0, 0.05)])  # clipped, not, no clip
def test_the_kernel_update_is_optaxs_to_float32_rounding(grad_clip, grad_scale):
    tc = TrainConfig(warmup_steps=0, lr=1e-2, grad_clip=grad_clip, max_steps=10)
    (p1, _), (p_ref, o_ref), (p, o) = _updates(tc, grad_scale)
    for before, want, got in zip(jax.tree.leaves(p1), jax.tree.leaves(p_ref), jax.tree.leaves(p)):
        want, got = np.asarray(want), np.asarray(got)
        step = np.abs(want - np.asarray(before))  # the update: lr-sized, every element moves
        assert np.all(step > 0)
        # the update to a few float32 roundings (1e-6 of it), then p + update rounded: an ulp of p either way
        assert np.all(np.abs(got - want) <= 1e-6 * step + 2 * np.spacing(np.abs(want)))
    for name in ("mu", "nu"):
        for want, got in zip(jax.tree.leaves(getattr(o_ref[1][0], name)), jax.tree.leaves(getattr(o[1][0], name))):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert jax.tree.structure(o) == jax.tree.structure(o_ref)  # optax's state: checkpoints and resume unchanged
    assert int(o[1][0].count) == int(o_ref[1][0].count) == 2 and int(o[1][2].count) == int(o_ref[1][2].count) == 2


@needs_kernels
def test_bfloat16_gradients_update_as_their_float32_values():
    tc = TrainConfig(warmup_steps=0, lr=1e-2, max_steps=10)
    _, state = create_state(CONFIG, tc, init_params(CONFIG, 0))
    rng = np.random.default_rng(2)
    g16 = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape) * 0.05, jnp.bfloat16), state.params)
    _, schedule = make_optimizer(tc)

    g32 = jax.tree.map(lambda a: a.astype(jnp.float32), g16)
    norm = optax.tree.norm(g32)  # one norm for both (clipped: the norm is above grad_clip)
    assert float(norm) > tc.grad_clip

    def step(g):
        return adamw.fused_update(tc, schedule, g, norm, jnp.isfinite(norm), state.params, state.opt_state,
                                  decayed(state.params))

    got = jax.jit(step)(g16)
    calls = [line for line in jax.jit(step).lower(g16).as_text().splitlines() if "@gptjax_adamw" in line]
    assert calls and all("bf16>" in line for line in calls)  # the kernel reads the bfloat16 gradients as they are
    want = jax.jit(step)(g32)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


@needs_kernels
def test_a_non_finite_step_changes_nothing():
    tc = TrainConfig(warmup_steps=0, lr=1e-2, max_steps=10)
    (p1, o1), _, (p, o) = _updates(tc, 0.05, finite=False)
    for before, after in zip(jax.tree.leaves((p1, o1)), jax.tree.leaves((p, o))):
        np.testing.assert_array_equal(after, before)


@needs_kernels
def test_the_train_step_runs_the_kernel_without_a_mesh_and_optax_with_one():
    tc = TrainConfig(batch_size=8, seq_len=16, warmup_steps=0, max_steps=10)
    tokens = np.random.default_rng(2).integers(0, 96, (1, 8, 17)).astype(np.int32)
    for mesh, calls in ((None, len(jax.tree.leaves(create_state(CONFIG, tc)[1].params))),
                        (make_mesh(data=2, fsdp=2, tensor=2), 0)):
        graphdef, state = create_state(CONFIG, tc, mesh=mesh)
        hlo = make_train_step().lower(graphdef, tc, state, tokens[..., :-1], tokens[..., 1:]).as_text()
        assert hlo.count("gptjax_adamw") == calls
    # and the same training run, to float32 rounding, through either update
    losses = []
    for kernels in (True, False):
        graphdef, state = create_state(CONFIG, tc, init_params(CONFIG, 0))
        step, run = make_train_step(), []
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(cpu_kernels.ENV, "1" if kernels else "0")
            for i in range(5):
                state, m = step(graphdef, tc, state, tokens[..., :-1], tokens[..., 1:])
                run.append(float(m.loss))
        losses.append(run)
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    assert losses[0][-1] < losses[0][0] - 0.1


def test_bad_operands_name_their_shapes():
    with pytest.raises(ValueError, match=r"h \[12\] expected, got \(4,\), \(4,\), \(4,\), \(5,\) and \(12,\)"):
        cpu_kernels.adamw(jnp.zeros(4), jnp.zeros(4), jnp.zeros(4), jnp.zeros(5), jnp.zeros(12))
