"""Hugging Face checkpoint directories: `config.json`, `*.safetensors` (sharded or not), tokenizer."""
from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np
from safetensors import safe_open

from tokcomp_jax.checkpoints.weights import CheckpointError
from tokcomp_jax.models.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}).") from e


def read_config(directory: str) -> ModelConfig:
    """Reads `config.json` into a `ModelConfig`."""
    path = os.path.join(directory, "config.json")
    hf_config = _read_json(path)
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{path} does not hold a JSON object.")
    try:
        return ModelConfig.from_hf(hf_config)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e


def safetensors_files(directory: str) -> list[str]:
    """The weight files of a checkpoint: the shards named by the index, or `model.safetensors`."""
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        weight_map = _read_json(index_path)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_path} has no weight_map of tensor names to file names.")
        names = sorted(set(weight_map.values()))
        if not names:
            raise CheckpointError(f"{index_path} has an empty weight_map.")
    else:
        names = ["model.safetensors"]
    files = [os.path.join(directory, n) for n in names]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        hint = ""
        torch_files = ("pytorch_model.bin", "pytorch_model.bin.index.json")
        if any(os.path.isfile(os.path.join(directory, n)) for n in torch_files):
            hint = " (only .safetensors weights load; this directory has PyTorch .bin files)"
        raise CheckpointError(
            f"weight file(s) missing from {directory}: {', '.join(map(os.path.basename, missing))}{hint}.")
    return files


def read_weights(directory: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yields `(name, array)` for every tensor of the checkpoint (bfloat16 kept as bfloat16)."""
    for path in safetensors_files(directory):
        try:
            with safe_open(path, framework="flax") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for bad headers/sizes
            raise CheckpointError(f"{path} is truncated or corrupt: {e}") from e
