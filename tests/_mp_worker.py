"""Worker for test_sharding's multi-process test: N processes (gloo collectives on CPU) train three
data-parallel steps, each feeding only its own rows of the global batch, then save and restore an orbax
checkpoint from all of them; process 0 prints the losses and writes the weights.

    python _mp_worker.py NUM_PROCESSES PROCESS_ID PORT OUT_DIR
"""

import json
import os
import sys


def main(n_proc: int, pid: int, port: str, out_dir: str) -> None:
    """Join the job (before JAX touches a device), train, checkpoint, report."""
    if n_proc > 1:
        from gptjax.sharding import initialize_distributed

        initialize_distributed(f"127.0.0.1:{port}", n_proc, pid)
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils

    from gptjax import GPTConfig
    from gptjax.sharding import make_mesh, shard_batch
    from gptjax.train import TrainConfig, create_state, train_step

    config = GPTConfig(vocab_size=64, n_positions=16, n_layer=1, n_head=2, n_embd=16)
    tc = TrainConfig(batch_size=4, seq_len=16, warmup_steps=0, max_steps=10)
    mesh = make_mesh(data=2)
    graphdef, state = create_state(config, tc, mesh=mesh)
    rng, losses = np.random.default_rng(0), []
    for _ in range(3):
        batch = rng.integers(0, 64, (1, 4, 17)).astype(np.int32)  # the same global batch in every process
        rows = 4 // jax.process_count()
        local = batch[:, jax.process_index() * rows:(jax.process_index() + 1) * rows]  # this process's rows
        state, metrics = train_step(graphdef, tc, state, shard_batch(local[..., :-1], mesh, 1),
                                    shard_batch(local[..., 1:], mesh, 1))
        losses.append(float(metrics.loss))
    manager = ocp.CheckpointManager(os.path.join(out_dir, f"ck{n_proc}"))
    manager.save(3, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    restored = manager.restore(3, args=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                                             state)))
    gather = lambda tree: [np.asarray(a) for a in multihost_utils.process_allgather(  # noqa: E731
        jax.tree.leaves(tree), tiled=True)]
    leaves, restored_leaves = gather(state.params), gather(restored.params)
    if pid == 0:
        np.savez(os.path.join(out_dir, f"params{n_proc}.npz"), *leaves)
        print(json.dumps({"losses": losses, "devices": jax.device_count(), "processes": jax.process_count(),
                          "restored_equal": all(np.array_equal(a, b) for a, b in zip(leaves, restored_leaves))}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
