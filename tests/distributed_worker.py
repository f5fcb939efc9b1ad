"""One process of a multi-process training run on localhost, for tests/test_distributed_training.py.

  python tests/distributed_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID WORKDIR OVERRIDES RESULT

joins the run at COORDINATOR ("localhost:PORT"), trains configs/train_tiny.py with OVERRIDES (JSON)
in the shared WORKDIR, restores the last checkpoint, and writes one JSON object to RESULT: the
process's view of the run, the rows each batch call read, the rows of the first global batch its
devices hold, and how far the restored state is from the trained one.
"""
import json
import sys

from tokcomp_jax.sharding import initialize_distributed


def main(coordinator: str, num_processes: str, process_id: str, workdir: str, overrides: str, result: str):
    initialize_distributed(coordinator, int(num_processes), int(process_id))  # before any other JAX call

    import jax
    import numpy as np

    from tokcomp_jax.training import Checkpoints, TokenWindows, Trainer, train
    from training_worker import tiny_config

    reads = []
    read_batch = TokenWindows.batch

    def recorded_batch(self, step, process_index=0, process_count=1):
        rows = read_batch(self, step, process_index, process_count)
        reads.append({"step": step, "process_index": process_index, "process_count": process_count,
                      "rows": len(rows["ids"])})
        return rows

    TokenWindows.batch = recorded_batch
    config = tiny_config(json.loads(overrides))
    state = train(config, workdir)
    TokenWindows.batch = read_batch

    trainer = Trainer(config)
    checkpoints = Checkpoints(f"{workdir}/checkpoints", max_to_keep=config.checkpoint.max_to_keep)
    latest = checkpoints.latest_step()
    restored = checkpoints.restore(latest, trainer.abstract_state())
    checkpoints.close()
    difference = max(float(np.max(np.abs(np.asarray(a.data) - np.asarray(b.data))))
                     for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state))
                     for a, b in zip(x.addressable_shards, y.addressable_shards))

    local = trainer.data.batch(0, jax.process_index(), jax.process_count())["ids"]
    batch = trainer.batch(0)["ids"]
    held = {}  # global row -> its tokens, over this process's devices
    for shard in batch.addressable_shards:
        for row, tokens in zip(range(*shard.index[0].indices(len(batch))), np.asarray(shard.data)):
            held[row] = tokens.tolist()
    with open(result, "w") as f:
        json.dump({"process_index": jax.process_index(), "process_count": jax.process_count(),
                   "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
                   "reads": reads, "first_rows": local.tolist(), "global_rows_held": sorted(held),
                   "held_rows_are_local_rows": [held[row] for row in sorted(held)] == local.tolist(),
                   "latest_checkpoint": latest, "restored_difference": difference}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
