"""The train step: a task's loss in the compute dtype, gradients accumulated over micro-batches,
one optimizer update.

Trained parameters are float32 (the master copy the optimizer updates); the loss casts them to
`compute_dtype` and runs a model built for that dtype. Frozen parameters (the base model under LoRA)
are stored in the compute dtype already.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tokcomp_jax.training.lora import merge_lora
from tokcomp_jax.training.tasks import Task

LossFn = Callable[[Any, Any, dict], tuple[jax.Array, dict]]


def cast_floats(tree, dtype):
    """`tree` with its floating-point arrays cast to `dtype` (integer arrays, keys unchanged)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_loss(task: Task, graphdef: nnx.GraphDef, trainable: str, compute_dtype, lora_scale: float = 1.0,
              task_graphdef: nnx.GraphDef | None = None) -> LossFn:
    """loss(trained, frozen, batch) -> (loss, metrics) of `task`.

    trained: `{"model": ..., "task": ...}`, the model's trained parameters (all of them for
    `trainable` "full", LoRA adapters for "lora", `{}` for "none") and the task's, as pure dicts;
    frozen: the model parameters that aren't trained (for "full": `{}`, or the initial parameters
    where `task.reads_base_model`, which the task then reads as the base model). `graphdef` is the
    model's, built for `compute_dtype`; `task_graphdef` rebuilds an `nnx.Module` the task's `init` returned.
    """
    def loss(trained, frozen, batch):
        if trainable == "full":
            params = cast_floats(trained["model"], compute_dtype)
        elif trainable == "lora":
            params = cast_floats(merge_lora(frozen, trained["model"], lora_scale), compute_dtype)
        else:
            params = frozen
        task_params = cast_floats(trained["task"], compute_dtype)
        if task_graphdef is not None:
            task_params = nnx.merge(task_graphdef, task_params)
        model = nnx.merge(graphdef, params)
        if task.reads_base_model:
            return task.loss(model, task_params, batch, nnx.merge(graphdef, frozen))
        return task.loss(model, task_params, batch)
    return loss


def micro_batches(batch: dict, count: int) -> dict:
    """`[rows, ...]` arrays as `[count, rows / count, ...]`: micro-batch i holds rows i, i + count, ...,
    so that each device's rows spread over all micro-batches."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(loss: LossFn, tx: optax.GradientTransformation, accum_steps: int):
    """step(trained, opt_state, frozen, batch) -> (trained, opt_state, metrics): one update with the
    mean gradient of `accum_steps` micro-batches, which equals one batch's gradient for a loss that
    is a mean over rows. metrics: the mean loss and task metrics, and the gradient's global norm
    before clipping."""
    grad_fn = jax.value_and_grad(loss, has_aux=True)

    def step(trained, opt_state, frozen, batch):
        if accum_steps == 1:
            (value, metrics), grads = grad_fn(trained, frozen, batch)
            metrics = {**metrics, "loss": value}
        else:
            def accumulate(grads, micro_batch):
                (value, metrics), micro_grads = grad_fn(trained, frozen, micro_batch)
                return jax.tree.map(jnp.add, grads, micro_grads), {**metrics, "loss": value}

            zeros = jax.tree.map(jnp.zeros_like, trained)
            grads, metrics = jax.lax.scan(accumulate, zeros, micro_batches(batch, accum_steps))
            grads = jax.tree.map(lambda g: g / accum_steps, grads)
            metrics = {name: value.mean() for name, value in metrics.items()}
        updates, opt_state = tx.update(grads, opt_state, trained)
        metrics["grad_norm"] = optax.global_norm(grads)
        return optax.apply_updates(trained, updates), opt_state, metrics
    return step
