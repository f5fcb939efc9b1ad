"""Builds a model from Hugging Face-named weights without initialising random parameters."""
from __future__ import annotations

from typing import Iterable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tokcomp_jax.models.config import ModelConfig
from tokcomp_jax.models.llama import Llama

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt or does not fit the model."""


def resolve_dtype(dtype) -> jnp.dtype:
    """Checks a user-given dtype name (`"float32"`, `"bfloat16"`, ...) and returns the dtype."""
    name = dtype if isinstance(dtype, str) else getattr(jnp.dtype(dtype), "name", str(dtype))
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}.")
    return jnp.dtype(name)


def _param_path(hf_name: str) -> tuple[tuple, bool]:
    """Maps `model.layers.3.self_attn.q_proj.weight` to our path and whether to transpose."""
    parts = hf_name.removeprefix("model.").split(".")
    path = [int(p) if p.isdigit() else p for p in parts]
    owner = parts[-2] if len(parts) > 1 else ""
    if path[-1] == "weight" and (owner.endswith("_proj") or owner == "lm_head"):
        return tuple(path[:-1]) + ("kernel",), True
    if path[-1] == "weight" and owner == "embed_tokens":
        return tuple(path[:-1]) + ("embedding",), False
    return tuple(path), False


def build_model(config: ModelConfig, weights: Iterable[tuple[str, np.ndarray]], dtype="float32",
                source: str = "checkpoint", attn_impl: str = "xla") -> Llama:
    """Fills a `Llama` with `(hf_name, array)` pairs, checking that every parameter is given once."""
    dtype = resolve_dtype(dtype)
    abstract = nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0), attn_impl=attn_impl))
    graphdef, state = nnx.split(abstract)
    params = dict(nnx.to_flat_state(state))
    filled, unexpected = set(), []
    for name, array in weights:
        path, transpose = _param_path(name)
        if path not in params:
            # Rotary inv_freq buffers and a tied model's copy of the embeddings carry nothing we
            # need; anything else (a bias, a layer the config lacks) means config and weights disagree.
            if not (name.endswith("rotary_emb.inv_freq") or
                    (name == "lm_head.weight" and config.tie_word_embeddings)):
                unexpected.append(name)
            continue
        if path in filled:
            raise CheckpointError(f"{source}: tensor {name!r} is given twice.")
        expected = tuple(params[path].get_value().shape)
        expected = expected[::-1] if transpose else expected  # in the checkpoint's [out, in] layout
        if tuple(array.shape) != expected:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(array.shape)}, the config implies {expected}.")
        array = array.T if transpose else array
        params[path].set_value(jnp.asarray(array, dtype))
        filled.add(path)
    if unexpected:
        raise CheckpointError(
            f"{source} has {len(unexpected)} tensors that the config does not use, e.g. {unexpected[:3]}; "
            "the weights and the config disagree.")
    missing = sorted(".".join(map(str, p)) for p in set(params) - filled)
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}.")
    return nnx.merge(graphdef, state)
