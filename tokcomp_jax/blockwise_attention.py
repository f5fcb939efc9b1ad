"""Attention of a chunk over a layer's cache, block by block with an online softmax (Milakov &
Gimelshein, 2018; FlashAttention, Dao et al., 2022): the XLA backend's attention.

The chunk's queries are taken `block_size` at a time, and each query block visits the cache's slots
`block_size` at a time up to the last slot that one of its queries can see (a trip count computed
on the device, so that one compiled program serves every fill of the cache; the blocks past it
are skipped by a conditional, which keeps the attention differentiable). A chunk's attention
thus costs the slots its queries can see, causally, not the cache's capacity, and no mask or score
matrix larger than one block is materialised. The query heads that share a KV head are stacked into
one matrix, so that each block is one matrix product per KV head, with no transpose of the cache.
Scores, softmax statistics and the weighted sum accumulate in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from tokcomp_jax.cache import LayerCache

DEFAULT_BLOCK_SIZE = 256  # queries and slots per block: large enough for GEMM efficiency, small enough to skip


def visible_slots(layer: LayerCache, latest: Int[Array, "B"]) -> Int[Array, ""]:
    """One past the last slot that a query at position `latest[b]` of row b or earlier sees: a
    valid entry at a position at or before it."""
    slot = jnp.arange(1, layer.capacity + 1, dtype=jnp.int32)
    seen = layer.valid_mask() & (layer.positions <= latest[:, None, None])
    return jnp.max(jnp.where(seen, slot, 0))


def blockwise_attend(queries: Float[Array, "B T H D"], layer: LayerCache, query_positions: Int[Array, "B T"], *,
                     sliding_window: int | None = None, extra_mask: Bool[Array, "B T C"] | None = None,
                     block_size: int = DEFAULT_BLOCK_SIZE) -> Float[Array, "B T H D"]:
    """Softmax attention of `queries` over the valid entries of `layer` at positions at or before
    each query's (within `sliding_window`, and not hidden by `extra_mask`); a query that sees no
    entry gets zeros. Equal to `tc.attention.attend` up to float32 summation order."""
    batch, steps, heads, dim = queries.shape
    _, kv_heads, capacity, _ = layer.keys.shape
    group = heads // kv_heads
    key_block, query_block = min(block_size, capacity), min(block_size, steps)
    padded = -(-steps // query_block) * query_block
    if padded > steps:  # padding queries at position -1 see nothing
        queries = jnp.pad(queries, ((0, 0), (0, padded - steps), (0, 0), (0, 0)))
        query_positions = jnp.pad(query_positions, ((0, 0), (0, padded - steps)), constant_values=-1)
        if extra_mask is not None:
            extra_mask = jnp.pad(extra_mask, ((0, 0), (0, padded - steps), (0, 0)))
    # [Q, B, Hkv, G * query_block, D]: per query block, the queries of one KV head, a row per (head, token).
    q = queries.reshape(batch, padded // query_block, query_block, kv_heads, group, dim).transpose(1, 0, 3, 4, 2, 5)
    q = q.reshape(padded // query_block, batch, kv_heads, group * query_block, dim)
    q_pos = query_positions.reshape(batch, padded // query_block, query_block).transpose(1, 0, 2)
    scale = dim ** -0.5

    def attend_block(index, q, q_pos):
        rows_pos = jnp.broadcast_to(q_pos[:, None, None, :], (batch, 1, group, query_block))
        rows_pos = rows_pos.reshape(batch, 1, group * query_block, 1)

        def visit(block, carry):
            running_max, total, acc = carry
            first = block * key_block
            start = jnp.minimum(first, capacity - key_block)  # the last block is shifted back to fit
            slots = start + jnp.arange(key_block, dtype=jnp.int32)
            keys = jax.lax.dynamic_slice_in_dim(layer.keys, start, key_block, axis=2)
            values = jax.lax.dynamic_slice_in_dim(layer.values, start, key_block, axis=2)
            positions = jax.lax.dynamic_slice_in_dim(layer.positions, start, key_block, axis=2)[:, :, None, :]
            live = (slots >= first) & (slots[None, None] < layer.lengths[:, :, None])  # [B, Hkv, K]
            mask = live[:, :, None, :] & (positions <= rows_pos)
            if sliding_window is not None:
                mask &= positions > rows_pos - sliding_window
            if extra_mask is not None:
                hidden = jax.lax.dynamic_slice(extra_mask, (0, index * query_block, start),
                                               (batch, query_block, key_block))[:, None, None]
                mask &= jnp.broadcast_to(hidden, (batch, 1, group, query_block, key_block)).reshape(
                    batch, 1, group * query_block, key_block)
            scores = jnp.einsum("bkmd,bkcd->bkmc", q, keys, preferred_element_type=jnp.float32) * scale
            scores = jnp.where(mask, scores, -jnp.inf)
            new_max = jnp.maximum(running_max, jnp.max(scores, axis=-1))
            shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)  # rows that have seen nothing yet
            probs = jnp.exp(scores - shift[..., None])
            rescale = jnp.exp(running_max - shift)
            total = total * rescale + jnp.sum(probs, axis=-1)
            acc = acc * rescale[..., None] + jnp.einsum("bkmc,bkcd->bkmd", probs.astype(values.dtype), values,
                                                         preferred_element_type=jnp.float32)
            return new_max, total, acc

        rows = (batch, kv_heads, group * query_block)
        carry = (jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros(rows, jnp.float32),
                 jnp.zeros((*rows, dim), jnp.float32))
        num_blocks = (visible_slots(layer, jnp.max(q_pos, axis=1)) + key_block - 1) // key_block

        def visit_if_seen(carry, block):  # a scan with a skip, not a loop of dynamic length: differentiable
            return jax.lax.cond(block < num_blocks, visit, lambda _, carry: carry, block, carry), None
        (_, total, acc), _ = jax.lax.scan(visit_if_seen, carry, jnp.arange(-(-capacity // key_block)))
        return jnp.where(total[..., None] > 0, acc / jnp.where(total > 0, total, 1.0)[..., None], 0.0)

    out = jax.lax.map(lambda args: attend_block(*args), (jnp.arange(padded // query_block), q, q_pos))
    out = out.reshape(padded // query_block, batch, kv_heads, group, query_block, dim).transpose(1, 0, 4, 2, 3, 5)
    return out.reshape(batch, padded, heads, dim)[:, :steps].astype(queries.dtype)
