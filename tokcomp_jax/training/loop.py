"""The trainer: a config made into a model, a task, a mesh and a sharded jitted train step; and the
training loop, with checkpoints, resumption and metrics.

>>> from tokcomp_jax.training import base_config
>>> config = base_config()
>>> config.update(data=dict(tokenizer="bytes"), model=dict(overrides=dict(vocab_size=264)))
>>> trainer = Trainer(config)
>>> state = trainer.init_state()
>>> trainer.batch(0)["ids"].shape
(8, 64)

and then, for each update, `state, metrics = trainer.step(state, trainer.batch(step))` (metrics:
the loss, the gradient norm and the task's metrics); `train(config, workdir)` runs that loop.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from tokcomp_jax.checkpoints import load
from tokcomp_jax.files import check_writable_directory
from tokcomp_jax.models.config import TINY_CONFIG
from tokcomp_jax.models.llama import Llama
from tokcomp_jax.sharding import activation_sharding, make_mesh, param_shardings, shardings_like
from tokcomp_jax.training.checkpoint import Checkpoints, abstract_like, restore_trained
from tokcomp_jax.training.config import check_config, config_from_json, names
from tokcomp_jax.training.data import ByteTokenizer, DataSource, batch_shardings, global_batch
from tokcomp_jax.training.errors import ConfigError
from tokcomp_jax.training.lora import init_lora
from tokcomp_jax.training.metrics import MetricsLog, format_record
from tokcomp_jax.training.optim import make_optimizer
from tokcomp_jax.training.step import cast_floats, make_loss, make_train_step
from tokcomp_jax.training.tasks import make_task

CONFIG_FILE, METRICS_FILE, CHECKPOINT_DIR = "config.json", "metrics.jsonl", "checkpoints"
DAMAGED_CHECKPOINT_DIR = "damaged_checkpoints"  # where checkpoints that fail to restore are moved
# Fields a resumed run may change: they don't change what is computed (a checkpoint restores onto
# any mesh; remat trades memory for time).
RESUMABLE_FIELDS = ("log_every", "eval_", "checkpoint.", "mesh.", "remat")


def host_device() -> jax.Device | None:
    """This process's first CPU device, whose arrays are in host memory; None where JAX runs no CPU
    backend (`JAX_PLATFORMS` without "cpu")."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return None


def load_model(config: ml_collections.ConfigDict):
    """The model `config.model` names (float32) and the tokenizer `config.data.tokenizer` names."""
    if config.model.name == "tiny":
        try:
            tiny = dataclasses.replace(TINY_CONFIG, **config.model.overrides.to_dict())
            model, tokenizer = Llama(tiny, dtype="float32", rngs=nnx.Rngs(config.seed)), None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.model.overrides: {e}") from e
    else:
        model, tokenizer = load(config.model.name, dtype="float32")
    if config.data.tokenizer == "bytes":
        tokenizer = ByteTokenizer()
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"config.data.tokenizer {config.data.tokenizer!r} has {tokenizer.vocab_size} tokens, more "
                          f"than the model's vocab_size {model.config.vocab_size}.")
    return model, tokenizer


def split_parameters(config: ml_collections.ConfigDict, base: dict, compute_dtype,
                     keep_base: bool = False) -> tuple[dict, dict]:
    """(trained, frozen) model parameters for `config.trainable`: all of `base` trained (float32), or
    LoRA adapters trained with `base` frozen, or `base` frozen; frozen ones in `compute_dtype`.
    `keep_base` keeps a frozen copy of `base` for "full" too (a task that reads the base model)."""
    if config.trainable == "full":
        return base, cast_floats(base, compute_dtype) if keep_base else {}
    if config.trainable == "none":
        return {}, cast_floats(base, compute_dtype)
    try:
        adapters = init_lora(base, names(config.lora.targets), config.lora.rank, jax.random.key(config.seed))
    except ValueError as e:
        raise ConfigError(f"config.lora.targets: {e}") from e
    return adapters, cast_floats(base, compute_dtype)


class Trainer:
    """A run's model, task, data, optimizer and mesh, and its jitted, sharded train step.

    The training state is `{"trained": {"model": ..., "task": ...}, "opt_state": ...}`: the trained
    parameters (float32, pure dicts: the model's, all or LoRA adapters, and the task's own) and the
    optimizer state, sharded by `tokcomp_jax.sharding`'s rules; the frozen model parameters are
    `self.frozen`, and `self.loss_fn(trained, frozen, batch)` is the task's loss. Batches are global
    arrays assembled from each process's rows.

    The model is loaded and the task initialised in host memory, and the initial trained parameters
    stay there (numpy) until `init_state` places each device's shards: no device holds the whole
    model. The loss's model keeps its hidden states sharded by rows (`activation_sharding`) and,
    with `config.remat`, rematerialises each decoder layer.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        check_config(config)
        self.config, self.task = config, make_task(config)
        try:
            self.mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        except ValueError as e:
            raise ConfigError(f"config.mesh: {e}") from e
        rows, replicas = config.batch_size // config.grad_accum_steps, self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if rows % replicas or config.batch_size % jax.process_count():
            raise ConfigError(f"config.batch_size / config.grad_accum_steps = {rows} rows per micro-batch must divide "
                              f"by the mesh's data * fsdp = {replicas} devices, and config.batch_size by the "
                              f"{jax.process_count()} processes.")
        dtype = jnp.dtype(config.compute_dtype)
        with jax.default_device(host_device()):
            model, self.tokenizer = load_model(config)
            task_params, task_graphdef = self.task.init(config, model, self.tokenizer), None
            if isinstance(task_params, nnx.Module):
                task_graphdef, task_state = nnx.split(task_params, nnx.Param)
                task_params = nnx.to_pure_dict(task_state)
            model_params, frozen = split_parameters(
                config, jax.device_get(cast_floats(nnx.to_pure_dict(nnx.state(model)), jnp.float32)), dtype,
                keep_base=self.task.reads_base_model)
            self._initial = jax.device_get({"model": model_params, "task": cast_floats(task_params, jnp.float32)})
        self.data = self.task.data(config, self.tokenizer, "train")
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: Llama(
            model.config, dtype=dtype, rngs=nnx.Rngs(0), activation_sharding=activation_sharding(self.mesh),
            remat=config.remat)))

        self._tx, self.schedule = make_optimizer(config.optim, config.steps, self.task.no_decay)
        self._abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self._initial)
        self.trained_shardings = param_shardings(self._abstract, self.mesh, extra_axes=self.task.extra_axes)
        self.opt_shardings = shardings_like(jax.eval_shape(self._tx.init, self._abstract), self.trained_shardings)
        frozen_shardings = param_shardings(frozen, self.mesh)
        self.frozen = jax.device_put(frozen, frozen_shardings)
        local = self.data.batch(0, jax.process_index(), jax.process_count())
        self.batch_shardings = batch_shardings(local, self.mesh, jax.process_count())

        self.loss_fn = make_loss(self.task, graphdef, config.trainable, dtype, config.lora.alpha / config.lora.rank,
                                 task_graphdef)
        self._step = jax.jit(
            make_train_step(self.loss_fn, self._tx, config.grad_accum_steps),
            in_shardings=(self.trained_shardings, self.opt_shardings, frozen_shardings, self.batch_shardings),
            out_shardings=(self.trained_shardings, self.opt_shardings, NamedSharding(self.mesh, PartitionSpec())),
            donate_argnums=(0, 1))
        self._eval = jax.jit(self.loss_fn,
                             in_shardings=(self.trained_shardings, frozen_shardings, self.batch_shardings),
                             out_shardings=NamedSharding(self.mesh, PartitionSpec()))
        if config.eval_every:
            self._held_out  # checked before anything runs

    @functools.cached_property
    def _held_out(self) -> DataSource:
        config = self.config
        held_out = self.task.data(config, self.tokenizer, "held_out")
        if config.eval_batches > held_out.num_batches:
            raise ConfigError(f"config.eval_batches is {config.eval_batches}, but the held-out documents hold "
                              f"{held_out.num_batches} batches of {config.batch_size} rows; ask for at most "
                              f"{held_out.num_batches}.")
        return held_out

    def evaluate(self, state: dict) -> dict[str, float]:
        """The task's loss and metrics on `config.eval_batches` held-out batches (the same ones at
        every call, from documents training never reads), as `eval_loss`, `eval_<metric>`."""
        results = []
        for index in range(self.config.eval_batches):
            local = self._held_out.batch(index, jax.process_index(), jax.process_count())
            loss, metrics = self._eval(state["trained"], self.frozen, global_batch(local, self.batch_shardings))
            results.append({"loss": loss, **metrics})
        results = jax.device_get(results)  # one transfer, after every batch is dispatched
        return {f"eval_{name}": float(np.mean([result[name] for result in results])) for name in results[0]}

    def init_state(self) -> dict:
        """The state before the first update, on the mesh: the trained parameters of the newest
        checkpoint of `config.init_from` if set, else the initial ones; once per trainer, as it
        frees the host's copy of the initial parameters."""
        if self._initial is None:
            raise RuntimeError("Trainer.init_state makes the first state once and then frees the initial parameters; "
                               "build a new Trainer for another.")
        if self.config.init_from:
            try:
                trained = restore_trained(os.path.join(self.config.init_from, CHECKPOINT_DIR),
                                          self.abstract_state()["trained"])
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"config.init_from: {e}") from e
        else:  # may_alias=False: the step donates the state, which must not share memory with the host copy.
            trained = jax.device_put(self._initial, self.trained_shardings, may_alias=False)
        self._initial = None
        return {"trained": trained, "opt_state": jax.jit(self._tx.init, out_shardings=self.opt_shardings)(trained)}

    def abstract_state(self) -> dict:
        """The state's shapes, dtypes and shardings: the target a checkpoint restores into."""
        return {"trained": abstract_like(self._abstract, self.trained_shardings),
                "opt_state": abstract_like(jax.eval_shape(self._tx.init, self._abstract), self.opt_shardings)}

    def lower_step(self) -> jax.stages.Lowered:
        """The train step lowered for this run's shapes and shardings, without running it:
        `.compile().memory_analysis()` gives XLA's bytes per device (on CPU, compile with
        `tokcomp_jax.testing.KEEP_REMAT_ON_CPU` to see what `config.remat` saves)."""
        state = self.abstract_state()
        return self._step.lower(state["trained"], state["opt_state"], self.frozen, self.batch(0))

    def batch(self, step: int) -> dict[str, jax.Array]:
        """Global batch `step` (0-based: update `step + 1` reads it), from this process's rows."""
        return global_batch(self.data.batch(step, jax.process_index(), jax.process_count()), self.batch_shardings)

    def step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        """One update; `state`'s arrays are donated. Returns the new state and the metrics."""
        trained, opt_state, metrics = self._step(state["trained"], state["opt_state"], self.frozen, batch)
        return {"trained": trained, "opt_state": opt_state}, metrics


def flatten_dict(tree: dict, separator: str = ".", prefix: str = "") -> dict:
    """`{"a": {"b": 1}}` as `{"a.b": 1}` (keys joined with `separator`)."""
    flat = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_dict(value, separator, f"{prefix}{name}{separator}"))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def check_same_run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Raises if `workdir/config.json` differs from `config` but for fields that don't change what
    is computed, so that a run never resumes from another run's checkpoints (fields added since it
    ran count at their defaults)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        previous = flatten_dict(json.loads(config_from_json(f.read()).to_json()))
    current = flatten_dict(json.loads(config.to_json()))
    changed = sorted(key for key in current.keys() | previous.keys()
                     if current.get(key) != previous.get(key) and not key.startswith(RESUMABLE_FIELDS))
    if changed:
        raise ConfigError(f"{workdir} holds checkpoints of a run whose config differs in {', '.join(changed)}; "
                          f"resume it with the same config, or train in a new workdir.")


@dataclasses.dataclass
class _Throughput:
    """Tokens per second between log steps."""

    step: int
    time: float = dataclasses.field(default_factory=time.perf_counter)

    def __call__(self, step: int, tokens_per_batch: int) -> float:
        now = time.perf_counter()
        rate = (step - self.step) * tokens_per_batch / max(now - self.time, 1e-9)
        self.step, self.time = step, now
        return rate


def train(config: ml_collections.ConfigDict, workdir: str, *,
          on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Trains for `config.steps` updates, resuming from the newest checkpoint in `workdir` that
    restores (newer, damaged ones are moved to `workdir/damaged_checkpoints/`; a new workdir starts
    from `config.init_from`'s trained parameters if set); returns the final state.

    `workdir` gets `config.json`, `checkpoints/` (every `config.checkpoint.every` updates and the
    last) and `metrics.jsonl` (every `config.log_every` updates: step, loss, grad_norm, lr,
    tokens_per_s and the task's metrics; every `config.eval_every`: the held-out `Trainer.evaluate`).
    `on_step(step, state)` runs after each update.
    """
    try:
        check_writable_directory(workdir, "workdir")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    fresh = not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR))
    if fresh and config.init_from and not os.path.isdir(os.path.join(config.init_from, CHECKPOINT_DIR)):
        raise ConfigError(f"config.init_from must be the workdir of an earlier run, which holds {CHECKPOINT_DIR}/; "
                          f"{config.init_from!r} does not.")
    trainer = Trainer(config)
    checkpoints = Checkpoints(os.path.join(workdir, CHECKPOINT_DIR), max_to_keep=config.checkpoint.max_to_keep,
                              async_save=config.checkpoint.async_save)
    if checkpoints.latest_step():
        check_same_run(config, workdir)
    lead = jax.process_index() == 0
    if lead:  # atomically: other processes may be reading it in check_same_run
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, CONFIG_FILE)
        with open(f"{path}.tmp", "w") as f:
            f.write(config.to_json(indent=2))
        os.replace(f"{path}.tmp", path)
    start, state = checkpoints.restore_latest(trainer.abstract_state(),
                                              os.path.join(workdir, DAMAGED_CHECKPOINT_DIR))
    if state is None:
        state = trainer.init_state()
    log = MetricsLog(os.path.join(workdir, METRICS_FILE), start) if lead else None
    throughput = _Throughput(start)
    with tqdm(total=config.steps, initial=start, desc="train", disable=not lead, dynamic_ncols=True) as bar:
        for step in range(start, config.steps):
            state, metrics = trainer.step(state, trainer.batch(step))
            done = step + 1
            if done % config.checkpoint.every == 0 or done == config.steps:
                checkpoints.save(done, state)
            if done % config.log_every == 0 or done == config.steps:
                metrics = {name: float(value) for name, value in jax.device_get(metrics).items()}
                record = {"step": done, "loss": metrics.pop("loss"), "grad_norm": metrics.pop("grad_norm"),
                          "lr": float(trainer.schedule(step)),
                          "tokens_per_s": throughput(done, trainer.data.tokens_per_batch), **metrics}
                if lead:
                    log.write(record)
                    bar.write(format_record(record))
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
            if config.eval_every and (done % config.eval_every == 0 or done == config.steps):
                record = {"step": done, **trainer.evaluate(state)}
                if lead:
                    log.write(record)
                    bar.write(format_record(record))
            bar.update(1)
            if on_step is not None:
                on_step(done, state)
    checkpoints.close()
    return state
