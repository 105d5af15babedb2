"""Parallelism on 8 CPU devices: meshes, sharded forward/train/generate equal to one device, errors, multi-process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import GPTConfig, GptjaxError, get_backend, init_params
from gptjax.backends.jax import decode as jax_decode
from gptjax.cli import main
from gptjax.generate import make_request
from gptjax.sampling import GREEDY
from gptjax.sharding import make_mesh, parse_mesh, shard_batch
from gptjax.train import TrainConfig, create_state, train_step

CONFIG = GPTConfig(vocab_size=96, n_positions=32, n_layer=2, n_head=8, n_embd=32)
SHAPES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)]


def _params(config=CONFIG, seed=0):
    rng = np.random.default_rng(seed)
    return {k: v + rng.normal(0, 0.2, v.shape).astype(np.float32) for k, v in init_params(config, seed).items()}


def test_eight_devices_are_visible():
    assert jax.device_count() == 8  # conftest's XLA flag


def test_make_mesh_shapes_and_errors():
    assert dict(make_mesh(data=-1, tensor=2).shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert dict(make_mesh(**parse_mesh("fsdp=2,tensor=2")).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(GptjaxError, match=r"data=3 x fsdp=3 x tensor=1 = 9 devices, but 8 are available"):
        make_mesh(data=3, fsdp=3)
    with pytest.raises(GptjaxError, match="only one mesh size may be -1"):
        make_mesh(data=-1, fsdp=-1)
    with pytest.raises(GptjaxError, match="8 devices do not divide by 3"):
        make_mesh(data=-1, tensor=3)
    with pytest.raises(GptjaxError, match="tensor=0 must be a positive integer or -1"):
        make_mesh(tensor=0)
    with pytest.raises(GptjaxError, match="expected name=size"):
        parse_mesh("pipeline=2")


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_generate_equal_one_device(shape):
    params = _params()
    tokens = np.random.default_rng(1).integers(0, 96, (8, 20))
    single = get_backend("jax", CONFIG)
    sharded = get_backend("jax", CONFIG, mesh=make_mesh(*shape))
    np.testing.assert_allclose(sharded.forward(params, tokens), single.forward(params, tokens), atol=1e-5)
    prompts = [t[: 3 + i].tolist() for i, t in enumerate(tokens)]
    assert sharded.generate(params, prompts, 6, sampling=GREEDY).tokens == single.generate(params, prompts, 6,
                                                                                       sampling=GREEDY).tokens


@pytest.mark.slow
@pytest.mark.parametrize("shape,precision,kv_cache", [
    ((1, 1, 8), "bf16", None), ((2, 2, 2), "int8", "int8"), ((1, 1, 8), "int8", None), ((2, 1, 4), "w8a8", "bf16"),
    ((8, 1, 1), "int8", "int8"),
])
def test_reduced_precision_on_a_mesh_equals_one_device(shape, precision, kv_cache, monkeypatch):
    # a mesh runs XLA's formulations; one device would take gptjax's CPU kernels (compared with XLA's in
    # test_cpu_kernels.py), so the single-device reference is told to use XLA's too: this test is about partitioning
    monkeypatch.setenv("GPTJAX_CPU_KERNELS", "0")
    params, tokens = _params(), np.random.default_rng(4).integers(0, 96, (8, 11))
    options = {"precision": precision} | ({"kv_cache": kv_cache} if kv_cache else {})
    single = get_backend("jax", CONFIG, **options)
    sharded = get_backend("jax", CONFIG, mesh=make_mesh(*shape), **options)
    weights = sharded.prepare(params)
    c_fc = weights.state["blocks"][0]["mlp"]["c_fc"]["kernel"]["kernel"][...]
    assert c_fc.dtype == {"bf16": jnp.bfloat16}.get(precision, jnp.int8)
    if shape[2] > 1:
        assert c_fc.sharding.spec[1] == "tensor"  # the low-precision weights are split like the fp32 ones
    # int8/w8a8 on CPU quantise activations per token (lowp): another partitioning may round one value differently
    np.testing.assert_allclose(sharded.forward(weights, tokens), single.forward(params, tokens),
                               atol={"int8": 1e-3, "w8a8": 5e-3}.get(precision, 1e-4))
    prompts = [list(t[: 3 + i]) for i, t in enumerate(tokens[:6])]
    assert (sharded.generate(weights, prompts, 8, sampling=GREEDY).tokens
            == single.generate(params, prompts, 8, sampling=GREEDY).tokens)


@pytest.mark.parametrize("shape,expected", [
    ((8, 1, 1), (None, None)), ((1, 8, 1), ("fsdp", None)), ((1, 1, 8), (None, "tensor")),
    ((2, 2, 2), ("fsdp", "tensor")),
])
def test_parameters_and_kv_cache_are_sharded_as_intended(shape, expected):
    mesh = make_mesh(*shape)
    backend = get_backend("jax", CONFIG, mesh=mesh)
    weights = backend.prepare(_params())
    c_fc = weights.state["blocks"][0]["mlp"]["c_fc"]["kernel"]["kernel"]
    spec = tuple(c_fc[...].sharding.spec) + (None,) * 2
    assert spec[:2] == expected  # [D, F]: embed over fsdp, mlp over tensor
    qkv = weights.state["blocks"][0]["attn"]["c_attn"]["kernel"][...].sharding.spec  # [D, 3, H, K]
    assert (qkv[2] if len(qkv) > 2 else None) == ("tensor" if shape[2] > 1 else None)
    request = make_request(CONFIG, [[1, 2, 3]] * 8, 4)
    d, *_ = jax_decode.start(weights, request, 8, 16, mesh)
    cache_spec = tuple(d.cache.layers[0].k.sharding.spec) + (None,) * 4  # [B, H, S, K]
    assert cache_spec[1] == ("tensor" if shape[2] > 1 else None)


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES)
def test_training_steps_equal_one_device(shape):
    # one AdamW step at full learning rate (no warm-up): Adam's first update is lr * g / (|g| + eps), so a
    # parameter whose gradient is ~0 can move by up to lr on rounding noise alone; lr 1e-4 keeps that < 1e-5
    tc = TrainConfig(batch_size=8, seq_len=16, warmup_steps=0, lr=1e-4, min_lr=1e-5)
    x = np.random.default_rng(2).integers(0, 96, (1, 8, 17)).astype(np.int32)
    graphdef, ref = create_state(CONFIG, tc)
    ref, ref_m = train_step(graphdef, tc, ref, x[..., :-1], x[..., 1:])
    mesh = make_mesh(*shape)
    graphdef, state = create_state(CONFIG, tc, mesh=mesh)
    state, m = train_step(graphdef, tc, state, shard_batch(x[..., :-1], mesh, 1), shard_batch(x[..., 1:], mesh, 1))
    assert float(m.loss) == pytest.approx(float(ref_m.loss), abs=1e-5)
    assert float(m.grad_norm) == pytest.approx(float(ref_m.grad_norm), rel=1e-5)
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    mu = state.opt_state[1][0].mu["blocks"][0]["mlp"]["c_fc"]["kernel"]["kernel"]
    param = state.params["blocks"][0]["mlp"]["c_fc"]["kernel"]["kernel"]
    assert mu[...].sharding.spec == param[...].sharding.spec  # optimizer state sharded alike


def test_non_power_of_two_heads():
    config = GPTConfig(vocab_size=96, n_positions=32, n_layer=1, n_head=6, n_embd=48)
    params, tokens = _params(config), np.random.default_rng(3).integers(0, 96, (4, 9))
    single = get_backend("jax", config).forward(params, tokens)
    for mesh in (make_mesh(data=4, tensor=2), make_mesh(data=2, tensor=3, devices=jax.devices()[:6])):
        np.testing.assert_allclose(get_backend("jax", config, mesh=mesh).forward(params, tokens), single, atol=1e-5)


def test_bad_shapes_name_both_numbers():
    with pytest.raises(GptjaxError, match="n_head=8 is not divisible by the mesh's tensor size 3"):
        get_backend("jax", CONFIG, mesh=make_mesh(data=2, tensor=3, devices=jax.devices()[:6]))
    backend = get_backend("jax", CONFIG, mesh=make_mesh(data=4, tensor=2))
    with pytest.raises(GptjaxError, match="dimension 6 is not divisible by the mesh's data size 4"):
        backend.forward(_params(), np.zeros((6, 4), np.int32))
    tc = TrainConfig(batch_size=6)
    with pytest.raises(GptjaxError, match="dimension 6 is not divisible by the mesh's data x fsdp size 8"):
        from gptjax.train import TrainOptions, train

        train(CONFIG, tc, "/tmp/never", TrainOptions(data_spec=str(Path(__file__)), mesh=make_mesh(data=4, fsdp=2),
                                                     progress=False))


@pytest.mark.slow
def test_cli_train_on_a_mesh_and_the_memory_report(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("def f(x):\n    return x * 2\n" * 300)
    (tmp_path / "d.txt").write_text("class A:\n    pass\n" * 300)
    assert main(["train", "--out", str(tmp_path / "r"), "--data", str(tmp_path), "--mesh", "data=2,fsdp=2,tensor=2",
                 "--no-progress", "--max-steps", "2", "--peak-flops", "1e11", "n_layer=1", "n_embd=32", "n_head=2",
                 "n_positions=32", "batch_size=4"]) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    assert main(["info", "gpt2", "--mesh", "data=2,fsdp=2,tensor=2", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "| parameters | 474.70 MiB | 118.68 MiB | 0.250x |" in out and "| optimizer |" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.integration
def test_two_processes_train_like_one_process_with_two_devices(tmp_path):
    worker = str(Path(__file__).parent / "_mp_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, worker, "2", str(i), port, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=env | {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    two = json.loads(outs[0][0].strip().splitlines()[-1])
    one = json.loads(subprocess.run([sys.executable, worker, "1", "0", "0", str(tmp_path)], capture_output=True,
                                    text=True, check=True, timeout=300,
                                    env=env | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
                                    ).stdout.strip().splitlines()[-1])
    assert two["processes"] == 2 and one["processes"] == 1 and two["devices"] == one["devices"] == 2
    assert two["losses"] == one["losses"]
    assert two["restored_equal"] and one["restored_equal"]  # orbax save/restore from all processes
    a, b = np.load(tmp_path / "params2.npz"), np.load(tmp_path / "params1.npz")
    assert all(np.array_equal(a[k], b[k]) for k in a)
