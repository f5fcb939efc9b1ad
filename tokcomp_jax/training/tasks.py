"""What a learned compressor trains, as a `Task`, and the registry of tasks by name.

A task says which new parameters it adds (`init`), what it minimises (`loss`) and what it reads
(`data`); the trainer owns everything else: which model parameters are trained (`config.trainable`:
all, LoRA adapters, none), mixed precision, gradient accumulation, the optimizer, sharding and
checkpoints. A new method registers a factory, `register_task("gist", gist)`; `config.task = "gist"`
selects it, and its own fields go in a sub-config of its name (`config.gist = ConfigDict(...)` in
its `configs/train_*.py`):

>>> def gist(config):
...     def init(config, model, tokenizer):
...         return {"gist_tokens": jnp.zeros((config.gist.num_tokens, model.config.hidden_size))}
...     def loss(model, params, batch):
...         ...  # run `model` with params["gist_tokens"] spliced in; return (loss, {"accuracy": ...})
...     return Task(init=init, loss=loss, extra_axes={"gist_tokens": (None, "embed")},
...                 no_decay=("gist_tokens",))
>>> "lm" in task_names()
True
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from tokcomp_jax.learned.data import corpus_windows
from tokcomp_jax.training.data import DataSource, TokenWindows
from tokcomp_jax.training.errors import ConfigError


def lm_windows(config: ml_collections.ConfigDict, tokenizer, split: str) -> DataSource:
    """`{"ids": [rows, config.data.window]}` batches of `config.data.corpus`'s `split` documents; the
    training split's windows shift each epoch with `config.data.shift_windows`."""
    return TokenWindows(corpus_windows(tokenizer, config.data.corpus, split, config.data.window, config.batch_size,
                                       seed=config.seed, held_out_every=config.data.held_out_every,
                                       shift=config.data.shift_windows and split == "train"))


@dataclasses.dataclass(frozen=True)
class Task:
    """A training objective: new parameters, a loss and the data it reads.

    init(config, model, tokenizer) -> params: the task's own new parameters (gist-token embeddings, an
        ICAE projection), a pytree of float arrays or an `nnx.Module` holding only `nnx.Param`s, in
        float32; `{}` for none. `model` is the loaded model (float32), `tokenizer` its tokenizer.
        Draw random values from `config.seed`. Called once per run, before any checkpoint restore.
    loss(model, params, batch) -> (loss, metrics): a scalar to minimise and a dict of scalars to log.
        `model` is a `Llama` whose parameters are the effective ones (base + LoRA, or trained) in
        `config.compute_dtype`; `params` are the task's, cast likewise, in the kind `init` returned;
        `batch` is a dict of global arrays from `data`, one micro-batch of rows. Traced under `jax.jit`
        and differentiated with respect to the trained parameters. With gradient accumulation the
        update follows the mean of the micro-batches' losses: return a mean over equally weighted
        rows so that it equals the loss of the whole batch.
    data(config, tokenizer, split) -> DataSource: the batches, a pure function of the step
        (default: packed windows of `config.data.corpus`, as `{"ids": [rows, window]}`).
    extra_axes: the logical axes of the task's parameters, by "/"-joined path suffix
        (`{"gist_tokens": (None, "embed")}`), for `tokcomp_jax.sharding.param_shardings`.
    no_decay: path suffixes of the task's parameters that weight decay skips (new-token embeddings).
        Vectors (norms, biases) are never decayed.
    reads_base_model: `loss` takes a fourth argument, the loaded model as it was (no adapters, no
        updates; in `config.compute_dtype`, frozen), e.g. a context-distillation teacher; for
        `trainable` "full" the trainer keeps a frozen copy of the initial parameters for it.
    """

    init: Callable[[ml_collections.ConfigDict, Any, Any], Any]
    loss: Callable[[Any, Any, Mapping[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]
    data: Callable[[ml_collections.ConfigDict, Any, str], DataSource] = lm_windows
    extra_axes: Mapping[str, tuple[str | None, ...]] = dataclasses.field(default_factory=dict)
    no_decay: tuple[str, ...] = ()
    reads_base_model: bool = False


TaskFactory = Callable[[ml_collections.ConfigDict], Task]
_TASKS: dict[str, TaskFactory] = {}


def register_task(name: str, factory: TaskFactory) -> None:
    """Makes `config.task = name` build its task with `factory(config)`.

    The factory runs when the config is checked, before anything is loaded: keep it cheap, and raise
    `tokcomp_jax.training.ConfigError` naming the field for a bad value of the task's own fields.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a task name must be a non-empty string, got {name!r}.")
    if _TASKS.get(name, factory) is not factory:
        raise ValueError(f"task {name!r} is already registered; pick another name.")
    _TASKS[name] = factory


def task_names() -> list[str]:
    """The registered task names."""
    return sorted(_TASKS)


def make_task(config: ml_collections.ConfigDict) -> Task:
    """The task `config.task` names."""
    if config.task not in _TASKS:
        raise ConfigError(f"config.task {config.task!r} is not a registered task; known tasks: "
                          f"{', '.join(task_names())} (add one with tokcomp_jax.training.register_task).")
    task = _TASKS[config.task](config)
    if not isinstance(task, Task):
        raise TypeError(f"the factory of task {config.task!r} returned {type(task).__name__}, not a Task.")
    return task


def next_token_loss(model, params, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross-entropy of `batch["ids"]` `[B, T]` over its T - 1 predicted tokens."""
    del params
    ids = batch["ids"]
    inputs, targets = ids[:, :-1], ids[:, 1:]
    logits, _, _ = model(inputs, model.init_cache(*inputs.shape), jnp.ones(inputs.shape, bool), all_logits=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    accuracy = (jnp.argmax(logits, axis=-1) == targets).mean()
    return loss, {"accuracy": accuracy}


def lm_task(config: ml_collections.ConfigDict) -> Task:
    """Language modelling: next-token cross-entropy on packed windows, no parameters of its own
    (train the model with `config.trainable` "full" or "lora")."""
    if config.trainable == "none":
        raise ConfigError("config.trainable 'none' trains only a task's own parameters, and task 'lm' has none; "
                          "use 'full' or 'lora'.")
    return Task(init=lambda config, model, tokenizer: {}, loss=next_token_loss)


register_task("lm", lm_task)
