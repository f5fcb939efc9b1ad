"""Attention of new queries over a layer's KV cache: the pure-XLA reference and the Pallas kernels.

The implementation is a model option (`attn_impl`): "xla" (the reference, the default) or
"pallas" (`pallas_kernels`: a split-K decode kernel over the compressed cache, a flash prefill
kernel that also returns each query's log-sum-exp, and a per-key attention-mass kernel for the
presses' scores; interpreted on CPU). Both see the same entries: valid slots at token positions at
or before the query's.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels.common import uniform_starts
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.prefill_attention import prefill_attention
from pallas_kernels.window_scores import window_scores
from tokcomp_jax.cache import LayerCache, RaggedLayerCache

ATTN_IMPLS = ("xla", "pallas")


def check_attn_impl(attn_impl: str, sliding_window: int | None = None) -> None:
    """Raises unless `attn_impl` names an implementation that can run this model."""
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}.")
    if attn_impl == "pallas" and sliding_window is not None:
        raise ValueError(f"the Pallas kernels attend to the whole cache, but this model has a sliding window of "
                         f"{sliding_window} tokens; use attn_impl='xla'.")


class AttentionStats(NamedTuple):
    """What an attention kernel computed on the side, for the presses: lse `[B, H, T]` the
    log-sum-exp of each query's row (Pallas prefill), key_probs `[B, Hkv, C]` the attention
    probability of each entry summed over its query group (Pallas decode, when asked for)."""

    lse: Float[Array, "B H T"] | None = None
    key_probs: Float[Array, "B Hkv C"] | None = None


def attention_mask(layer: LayerCache | RaggedLayerCache, query_positions: Int[Array, "B T"],
                   sliding_window: int | None = None) -> Bool[Array, "B Hkv T C"]:
    """Which cache slots each query may see: valid entries at positions <= the query's own."""
    key_positions = layer.head_positions()[:, :, None, :]
    query_positions = query_positions[:, None, :, None]
    mask = layer.valid_mask()[:, :, None, :] & (key_positions <= query_positions)
    if sliding_window is not None:
        mask &= key_positions > query_positions - sliding_window
    return mask


def attention_probs(layer: LayerCache | RaggedLayerCache, queries: Float[Array, "B T H D"],
                    query_positions: Int[Array, "B T"], sliding_window: int | None = None,
                    extra_mask: Bool[Array, "B T C"] | None = None) -> Float[Array, "B Hkv G T C"]:
    """Softmax attention of `queries` over the cache in float32, GQA query heads grouped on their
    KV head (zeros for a query that sees no key). `extra_mask` hides more slots (e.g. gist masking)."""
    batch, steps, heads, dim = queries.shape
    kv_heads = layer.lengths.shape[1]
    kv = "bcd" if isinstance(layer, RaggedLayerCache) else "bkcd"
    grouped = queries.reshape(batch, steps, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum(f"btkgd,{kv}->bkgtc", grouped, layer.keys,
                        preferred_element_type=jnp.float32) * dim ** -0.5
    mask = attention_mask(layer, query_positions, sliding_window)
    if extra_mask is not None:
        mask &= extra_mask[:, None]
    mask = mask[:, :, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)


def attend(queries: Float[Array, "B T H D"], layer: LayerCache | RaggedLayerCache,
           query_positions: Int[Array, "B T"], *, sliding_window: int | None = None,
           extra_mask: Bool[Array, "B T C"] | None = None) -> Float[Array, "B T H D"]:
    """Softmax attention of `queries` over the cache (the XLA reference).

    Scores and softmax run in float32; a query that sees no key gets zeros. A ragged cache's pool
    is shared by the KV heads, each masked to its own segment. `extra_mask` `[B, T, C]` hides
    more slots from each query.
    """
    batch, steps, heads, dim = queries.shape
    probs = attention_probs(layer, queries, query_positions, sliding_window, extra_mask)
    kv = "bcd" if isinstance(layer, RaggedLayerCache) else "bkcd"
    out = jnp.einsum(f"bkgtc,{kv}->btkgd", probs.astype(layer.values.dtype), layer.values)
    return out.reshape(batch, steps, heads, dim)


def cache_pool(layer: LayerCache | RaggedLayerCache):
    """The cache as the kernels read it: keys, values `[B, N, D]`, positions `[B, N]`, starts and
    lengths `[B, Hkv]` (a uniform cache's heads one after another; lengths clipped to the slots)
    and the kernels' `max_segment` (a uniform cache's capacity, None for a ragged one)."""
    if isinstance(layer, RaggedLayerCache):
        lengths = jnp.minimum(layer.lengths, layer.segment_ends() - layer.starts)
        return layer.keys, layer.values, layer.positions, layer.starts, lengths, None
    batch, kv_heads, capacity, dim = layer.keys.shape
    return (layer.keys.reshape(batch, kv_heads * capacity, dim), layer.values.reshape(batch, kv_heads * capacity, dim),
            layer.positions.reshape(batch, kv_heads * capacity), uniform_starts(batch, kv_heads, capacity),
            jnp.minimum(layer.lengths, capacity), capacity)


def head_view(layer: LayerCache | RaggedLayerCache, per_slot: Float[Array, "B N"]) -> Float[Array, "B Hkv C"]:
    """A per-slot statistic of the pool, seen per KV head like `layer.head_positions()`."""
    if isinstance(layer, RaggedLayerCache):
        return jnp.where(layer.valid_mask(), per_slot[:, None, :], 0.0)
    return per_slot.reshape(layer.positions.shape)


def pallas_attend(queries: Float[Array, "B T H D"], layer: LayerCache | RaggedLayerCache,
                  query_positions: Int[Array, "B T"], *,
                  key_probs: bool = False) -> tuple[Float[Array, "B T H D"], AttentionStats]:
    """`attend` with the Pallas kernels, and what they give on the side: one query per row runs the
    decode kernel (every entry is at or before the newest token), emitting each entry's attention
    probability when `key_probs`; a chunk runs the prefill kernel, which returns the rows' lse."""
    keys, values, positions, starts, lengths, max_segment = cache_pool(layer)
    if queries.shape[1] == 1:
        result = decode_attention(queries[:, 0], keys, values, starts, lengths, return_probs=key_probs,
                                  max_segment=max_segment)
        out, probs = result if key_probs else (result, None)
        return out[:, None], AttentionStats(key_probs=None if probs is None else head_view(layer, probs))
    out, lse = prefill_attention(queries, keys, values, starts, lengths, positions, query_positions,
                                 max_segment=max_segment)
    return out, AttentionStats(lse=lse)


def attention_mass(layer: LayerCache, queries: Float[Array, "B W H D"], query_positions: Int[Array, "B W"],
                   query_weights: Float[Array, "B W"], *, attn_impl: str = "xla",
                   lse: Float[Array, "B H W"] | None = None) -> Float[Array, "B Hkv C"]:
    """Each entry's attention probability (softmax over each query's whole visible row), weighted
    per query and summed over the queries and the query heads of its KV head: the statistic of
    SnapKV's window, H2O's accumulated attention, A2SF and TOVA.

    With "pallas" no `[W, C]` matrix is written (`pallas_kernels.window_scores`; `lse` may come
    from the layer's own attention).
    """
    if attn_impl == "xla":
        probs = attention_probs(layer, queries, query_positions)
        return jnp.einsum("bkgwc,bw->bkc", probs, query_weights.astype(jnp.float32))
    keys, values, positions, starts, lengths, max_segment = cache_pool(layer)
    mass = window_scores(queries, keys, values, starts, lengths, positions, query_positions,
                         query_weights.astype(jnp.float32), lse=lse, max_segment=max_segment)
    return head_view(layer, mass)
