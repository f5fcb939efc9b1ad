"""Training runs in a subprocess, for tests/test_training.py.

  python tests/training_worker.py run WORKDIR OVERRIDES [BLOCK_AT]
      trains configs/train_tiny.py with OVERRIDES (JSON, {"checkpoint.every": 3, ...}); with
      BLOCK_AT, writes WORKDIR/blocked after that step and sleeps until killed.
  python tests/training_worker.py layouts WORKDIR OVERRIDES LAYOUTS
      trains once per mesh of LAYOUTS (JSON, {"name": {"data": 2, ...}}) in WORKDIR/name, restores
      the first run's last checkpoint onto the last mesh, and prints {"devices": ..., "losses":
      {"name": [...]}, "restored_shardings_kept": ..., "restored_difference": ...} (run it with
      several devices).
"""
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tokcomp_jax.training import Checkpoints, Trainer, read_metrics, train
from tokcomp_jax.training.loop import load_model

CONFIG = Path(__file__).parents[1] / "configs" / "train_tiny.py"


def tiny_config(overrides: dict):
    """configs/train_tiny.py's config with `overrides` ("a.b" keys) applied."""
    spec = importlib.util.spec_from_file_location("train_tiny", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.update_from_flattened_dict(overrides)
    return config


def model_config(config):
    """The ModelConfig of the model `config` trains."""
    return load_model(config)[0].config


def logits_magnitude(config, trained_states, batches) -> float:
    """The largest |logit| of the model `config` trains (trainable "full") with each of
    `trained_states`' parameters, over the inputs of each of `batches` (`[rows, window]` ids)."""
    graphdef = nnx.graphdef(load_model(config)[0])
    largest = 0.0
    for trained in trained_states:
        model = nnx.merge(graphdef, jax.device_get(trained["model"]))
        for ids in batches:
            inputs = jnp.asarray(np.asarray(ids))[:, :-1]
            logits, _, _ = model(inputs, model.init_cache(*inputs.shape), jnp.ones(inputs.shape, bool))
            largest = max(largest, float(jnp.abs(logits).max()))
    return largest


def block_at(step: int, workdir: str):
    def on_step(done, state):
        if done == step:
            Path(workdir, "blocked").touch()
            time.sleep(3600)
    return on_step


def main(mode: str, workdir: str, overrides: str, extra: str | None = None):
    config = tiny_config(json.loads(overrides))
    if mode == "run":
        train(config, workdir, on_step=block_at(int(extra), workdir) if extra else None)
        return
    losses, states = {}, {}
    for name, mesh in json.loads(extra).items():
        config.mesh.update(mesh)
        states[name] = train(config, os.path.join(workdir, name))
        losses[name] = [record["loss"] for record in read_metrics(os.path.join(workdir, name, "metrics.jsonl"))]
    # The first layout's last checkpoint, restored onto the last layout's mesh.
    first, *_, last = states
    restored = Checkpoints(os.path.join(workdir, first, "checkpoints"), max_to_keep=1).restore(
        config.steps, Trainer(config).abstract_state())
    shardings_kept = all(a.sharding.is_equivalent_to(b.sharding, a.ndim)
                         for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(states[last])))
    difference = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                     for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(states[first])))
    json.dump({"devices": jax.device_count(), "losses": losses, "restored_shardings_kept": shardings_kept,
               "restored_difference": difference}, sys.stdout)


if __name__ == "__main__":
    main(*sys.argv[1:])
