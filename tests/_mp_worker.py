"""Worker for test_sharding's multi-process test: N processes (gloo on CPU) train a few data-parallel steps
and save/restore an orbax checkpoint from all of them; process 0 prints losses and writes the weights."""
import json, os, sys
n_proc, pid, port, outdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
import jax
if n_proc > 1:
    from gptjax.sharding import initialize_distributed
    initialize_distributed(f"127.0.0.1:{port}", n_proc, pid)
import numpy as np, jax.numpy as jnp
from gptjax import GPTConfig
from gptjax.sharding import make_mesh, batch_sharding
from gptjax.train import TrainConfig, create_state, train_step
config = GPTConfig(vocab_size=64, n_positions=16, n_layer=1, n_head=2, n_embd=16)
tc = TrainConfig(batch_size=4, seq_len=16, warmup_steps=0, max_steps=10)
mesh = make_mesh(data=2)
graphdef, state = create_state(config, tc, mesh=mesh)
rng = np.random.default_rng(0)
sharding = batch_sharding(mesh, 3, leading=1)
losses = []
for step in range(3):
    batch = rng.integers(0, 64, (1, 4, 17)).astype(np.int32)  # the same global batch everywhere
    rows = 4 // jax.process_count()
    local = batch[:, jax.process_index() * rows:(jax.process_index() + 1) * rows]  # this process's slice
    x = jax.make_array_from_process_local_data(sharding, local[..., :-1], (1, 4, 16))
    y = jax.make_array_from_process_local_data(sharding, local[..., 1:], (1, 4, 16))
    state, m = train_step(graphdef, tc, state, x, y, jnp.float32(0))
    losses.append(float(m.loss))
import orbax.checkpoint as ocp
mngr = ocp.CheckpointManager(os.path.join(outdir, f"ck{n_proc}"))
mngr.save(3, args=ocp.args.StandardSave(state))
mngr.wait_until_finished()
abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
restored = mngr.restore(3, args=ocp.args.StandardRestore(abstract))
from jax.experimental import multihost_utils
leaves = [np.asarray(multihost_utils.process_allgather(a, tiled=True)) for a in jax.tree.leaves(state.params)]
rleaves = [np.asarray(multihost_utils.process_allgather(a, tiled=True)) for a in jax.tree.leaves(restored.params)]
same = all(np.array_equal(a, b) for a, b in zip(leaves, rleaves))
if pid == 0:
    np.savez(os.path.join(outdir, f"params{n_proc}.npz"), *leaves)
    print(json.dumps({"losses": losses, "restored_equal": same, "devices": jax.device_count(), "processes": jax.process_count()}))
