"""What the trainer does for memory: per-layer rematerialisation (the same losses and gradients), the
hidden states kept sharded by rows in every task's loss, XLA's bytes per device on 8 fake CPU devices
(a subprocess: tests/memory_worker.py), and no whole copy of the model on a device."""
import gc
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from tokcomp_jax.models.llama import Llama
from tokcomp_jax.testing import KEEP_REMAT_ON_CPU, TINY_CONFIG
from tokcomp_jax.training import Trainer
from tolerances import network, training_losses
from training_worker import logits_magnitude, model_config, tiny_config
from conftest import ROOT, TESTS

WORKER = str(TESTS / "memory_worker.py")
# Activations dwarf the weights: 512 tokens, 8 heads of 16, hidden 128; one row per device under fsdp=8.
ACTIVATION_HEAVY = {"model.overrides": {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 344,
                                        "num_layers": 4, "num_heads": 8, "num_kv_heads": 4, "head_dim": 16},
                    "data.window": 513, "batch_size": 8, "mesh.data": 1, "mesh.fsdp": 8}


def task_config(task: str, **overrides):
    config = tiny_config(overrides)
    config.task = task
    if task == "gist":
        config.gist = ml_collections.ConfigDict({"num_tokens": 4, "context_tokens": 40})
    if task == "icae":
        config.update_from_flattened_dict({"trainable": "none", "lora.rank": 4})
        config.icae = ml_collections.ConfigDict({"num_slots": 4, "context_tokens": 40, "ae_weight": 0.5})
    return config


def gradients_and_losses(remat: bool, steps: int = 4) -> tuple[dict, list[float], float]:
    """The first batch's gradients (remat kept apart on CPU), the losses of `steps` updates, and the
    largest |logit| of the first and the last parameters on the first and the last batch."""
    config = tiny_config({"remat": remat, "steps": steps})
    trainer = Trainer(config)
    state, batch = trainer.init_state(), trainer.batch(0)
    initial = jax.device_get(state["trained"])
    grad = jax.jit(jax.grad(lambda trained: trainer.loss_fn(trained, trainer.frozen, batch)[0]))
    grads = jax.device_get(grad.lower(state["trained"]).compile(KEEP_REMAT_ON_CPU)(state["trained"]))
    losses = []
    for step in range(steps):
        state, metrics = trainer.step(state, trainer.batch(step))
        losses.append(float(metrics["loss"]))
    magnitude = logits_magnitude(config, [initial, state["trained"]], [batch["ids"], trainer.batch(steps - 1)["ids"]])
    return grads, losses, magnitude


def test_remat_gives_the_same_gradients_and_losses():
    (grads, losses, magnitude), (remat_grads, remat_losses, _) = gradients_and_losses(False), gradients_and_losses(True)
    config = tiny_config({})
    model, window = model_config(config), config.data.window
    tokens = config.batch_size * (window - 1)
    # Recomputed in another order, float32 sums round differently: a gradient sums over the batch's
    # tokens through the network, relative to the largest gradient of its parameter.
    relative = network(max(model.hidden_size, model.intermediate_size, tokens), model.num_layers, 1.0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=relative * np.abs(b).max(), rtol=0),
                 remat_grads, grads)
    np.testing.assert_array_less(np.abs(np.subtract(remat_losses, losses)),
                                 training_losses(model, window - 1, tokens, losses, magnitude))


@pytest.mark.parametrize("task, model_calls", [("lm", 1), ("gist", 1), ("icae", 4)])
def test_every_task_loss_constrains_the_hidden_states_and_rematerialises_each_layer(task, model_calls):
    trainer = Trainer(task_config(task, remat=True))
    state = trainer.abstract_state()
    jaxpr = str(jax.make_jaxpr(lambda trained: trainer.loss_fn(trained, trainer.frozen, trainer.batch(0)))(
        state["trained"]))
    layers = TINY_CONFIG.num_layers
    # The embeddings, each layer's output and the final hidden states, in each call of the model.
    assert jaxpr.count("sharding_constraint[") == model_calls * (layers + 2)
    assert jaxpr.count("remat2[") == model_calls * layers  # jax.checkpoint


def test_activation_sharding_and_remat_cut_xla_temp_bytes_on_8_devices():
    flags = (f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8 "
             "--xla_backend_optimization_level=0").strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "KUBERNETES_"))}
    env.update(XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, WORKER, json.dumps(ACTIVATION_HEAVY)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    temp = json.loads(run.stdout.splitlines()[-1])
    assert temp["devices"] == 8
    # jax 0.10.2: 153 MB unconstrained, 100 MB constrained, 43 MB constrained with remat.
    assert temp["unconstrained"] > 1.3 * temp["constrained"], temp
    assert temp["remat"] < 0.7 * temp["constrained"], temp


def test_the_initial_model_stays_in_host_memory_until_init_state():
    gc.collect()
    before = {id(x) for x in jax.live_arrays()}
    trainer = Trainer(tiny_config({}))
    gc.collect()
    held = sum(x.nbytes for x in jax.live_arrays() if id(x) not in before)
    model_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.abstract_state()["trained"]))
    assert held < 0.05 * model_bytes, (held, model_bytes)

    state = trainer.init_state()
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
    with pytest.raises(RuntimeError, match="build a new Trainer"):
        trainer.init_state()


def test_activation_sharding_must_be_a_named_sharding():
    with pytest.raises(TypeError, match="NamedSharding"):
        Llama(TINY_CONFIG, rngs=nnx.Rngs(0), activation_sharding=PartitionSpec("data"))
