"""Attention of new queries over a layer's KV cache (the pure-XLA reference implementation)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from tokcomp_jax.cache import LayerCache, RaggedLayerCache


def attention_mask(layer: LayerCache | RaggedLayerCache, query_positions: Int[Array, "B T"],
                   sliding_window: int | None = None) -> Bool[Array, "B Hkv T C"]:
    """Which cache slots each query may see: valid entries at positions <= the query's own."""
    key_positions = layer.head_positions()[:, :, None, :]
    query_positions = query_positions[:, None, :, None]
    mask = layer.valid_mask()[:, :, None, :] & (key_positions <= query_positions)
    if sliding_window is not None:
        mask &= key_positions > query_positions - sliding_window
    return mask


def attend(queries: Float[Array, "B T H D"], layer: LayerCache | RaggedLayerCache,
           query_positions: Int[Array, "B T"], *, sliding_window: int | None = None) -> Float[Array, "B T H D"]:
    """Softmax attention of `queries` over the cache, GQA query heads grouped on their KV head.

    Scores and softmax run in float32; a query that sees no key gets zeros. A ragged cache's pool
    is shared by the KV heads, each masked to its own segment.
    """
    batch, steps, heads, dim = queries.shape
    kv_heads = layer.lengths.shape[1]
    kv = "bcd" if isinstance(layer, RaggedLayerCache) else "bkcd"
    grouped = queries.reshape(batch, steps, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum(f"btkgd,{kv}->bkgtc", grouped, layer.keys,
                        preferred_element_type=jnp.float32) * dim ** -0.5
    mask = attention_mask(layer, query_positions, sliding_window)[:, :, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)
    out = jnp.einsum(f"bkgtc,{kv}->btkgd", probs.astype(layer.values.dtype), layer.values)
    return out.reshape(batch, steps, heads, dim)
