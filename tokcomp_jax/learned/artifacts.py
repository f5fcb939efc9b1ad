"""Trained compressors as small files: what a training run trained (LoRA adapters, the task's own
parameters such as gist embeddings) in one safetensors file with the run's config, and back into a
model and the task's parameters, ready for `gist_press` and friends.

  export_trained("runs/gist_k16", "compressors/gist_k16.safetensors")
  trained = load_trained("compressors/gist_k16.safetensors")
  tc.generate(trained.model, trained.tokenizer, prompt, press=gist_press(trained.task_params))

Storage (`pack`, `unpack`), by default "int8_lora" (for rank-16 adapters, 0.29 of float32's bytes):
- "float32": as trained.
- "bfloat16": every floating-point parameter rounded to bfloat16 (8 significant bits: relative
  error at most 2**-8).
- "int8_lora": bfloat16, except the LoRA factors (`lora_a`, `lora_b`): each row (the last axis)
  holds int8 values q and one float32 scale s = max|row| / 127, stored as `<key>.scale`; the row is
  q * s, within s / 2 of the trained row.
Integer parameters stay as they are; loading gives float32 whatever the storage.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from tokcomp_jax.files import check_writable_directory
from tokcomp_jax.training.checkpoint import Checkpoints
from tokcomp_jax.training.config import check_config, config_from_json
from tokcomp_jax.training.loop import CHECKPOINT_DIR, CONFIG_FILE, Trainer, flatten_dict, load_model
from tokcomp_jax.training.lora import merge_lora
from tokcomp_jax.training.tasks import make_task

SEPARATOR = "/"
STORAGES = ("float32", "bfloat16", "int8_lora")
LORA_FACTORS = ("lora_a", "lora_b")
SCALE = ".scale"  # key suffix of an int8 LoRA factor's per-row scales


@dataclasses.dataclass
class TrainedCompressor:
    """A trained run's model (its trained parameters applied, float32), tokenizer, the task's own
    parameters (an `nnx.Module` when the task's `init` makes one, e.g. `GistTokens`) and config."""

    model: Any
    tokenizer: Any
    task_params: Any
    config: ml_collections.ConfigDict


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, name = key.split(SEPARATOR)
        node = tree
        for parent in parents:
            node = node.setdefault(int(parent) if parent.isdigit() else parent, {})
        node[int(name) if name.isdigit() else name] = value
    return tree


def _is_float(array: np.ndarray) -> bool:
    return jnp.issubdtype(array.dtype, jnp.floating)


def pack(arrays: dict[str, np.ndarray], storage: str = "int8_lora") -> dict[str, np.ndarray]:
    """Flat float32 parameters (key: path) in `storage` (one of STORAGES, see the module docstring)."""
    if storage not in STORAGES:
        raise ValueError(f"storage={storage!r}: pass one of {', '.join(STORAGES)}.")
    packed = {}
    for key, value in arrays.items():
        if storage == "float32" or not _is_float(value):
            packed[key] = value
        elif storage == "int8_lora" and key.rsplit(SEPARATOR, 1)[-1] in LORA_FACTORS:
            scale = (np.abs(value).max(axis=-1, keepdims=True) / 127).astype(np.float32)
            scale[scale == 0] = 1
            packed[key], packed[key + SCALE] = np.round(value / scale).astype(np.int8), scale
        else:
            packed[key] = value.astype(jnp.bfloat16)
    return packed


def unpack(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float32 parameters of arrays `pack` made, whatever its storage."""
    unpacked = {}
    for key, value in arrays.items():
        if key.endswith(SCALE):
            continue
        if key + SCALE in arrays:
            unpacked[key] = value.astype(np.float32) * arrays[key + SCALE]
        else:
            unpacked[key] = value.astype(np.float32) if _is_float(value) else value
    return unpacked


def export_trained(workdir: str, path: str, step: int | None = None, storage: str = "int8_lora") -> str:
    """Writes the trained parameters of `workdir`'s checkpoint `step` (default: the newest), in
    `storage` (one of STORAGES), and the run's config to the safetensors file `path`; returns `path`.
    Optimizer state is left out."""
    check_writable_directory(os.path.dirname(os.path.abspath(path)), "path's directory")
    config_path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{workdir} holds no {CONFIG_FILE}: pass the workdir of a training run.")
    with open(config_path) as f:
        config_json = f.read()
    trainer = Trainer(config_from_json(config_json))
    checkpoints = Checkpoints(os.path.join(workdir, CHECKPOINT_DIR), max_to_keep=1, async_save=False)
    step = checkpoints.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir} holds no finished checkpoint yet.")
    trained = jax.device_get(checkpoints.restore(step, trainer.abstract_state())["trained"])
    checkpoints.close()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arrays = {key: np.asarray(value) for key, value in flatten_dict(trained, SEPARATOR).items()}
    save_file(pack(arrays, storage), path, metadata={"config": config_json, "step": str(step)})
    return path


def _read_safetensors(path: str) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """The metadata and arrays of a safetensors file; `ValueError` naming it if it is missing,
    truncated or not safetensors."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a file; give a .safetensors file written by export_trained.")
    try:
        with safe_open(path, "np") as f:
            return f.metadata() or {}, {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path} is truncated or not a safetensors file ({e}); export it again with "
                         f"export_trained.") from None


def load_trained(path: str) -> TrainedCompressor:
    """The model and task parameters (float32) of a file `export_trained` wrote, in any storage. The
    base model is loaded as the run's `config.model.name` says (the same weights must be at hand)."""
    metadata, arrays = _read_safetensors(path)
    if "config" not in metadata:
        raise ValueError(f"{path} holds no training config: it is not a trained compressor; write one with "
                         f"export_trained.")
    config = config_from_json(metadata["config"])
    check_config(config)
    trained = _unflatten(unpack(arrays))
    model, tokenizer = load_model(config)
    state = nnx.state(model)
    base = nnx.to_pure_dict(state)
    model_params = trained.get("model", {})
    if config.trainable == "lora":
        params = merge_lora(base, model_params, config.lora.alpha / config.lora.rank)
    else:
        params = model_params if config.trainable == "full" else base
    nnx.replace_by_pure_dict(state, jax.tree.map(np.asarray, params))
    nnx.update(model, state)
    task_params = make_task(config).init(config, model, tokenizer)
    if isinstance(task_params, nnx.Module):
        task_state = nnx.state(task_params, nnx.Param)
        nnx.replace_by_pure_dict(task_state, trained.get("task", {}))
        nnx.update(task_params, task_state)
    else:
        task_params = trained.get("task", {})
    return TrainedCompressor(model, tokenizer, task_params, config)
