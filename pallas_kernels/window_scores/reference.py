"""Dense window scores: the `[B, H, W, N]` softmax of the window queries over the pool, summed."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import segment_mask


def window_scores_reference(q, keys, values, starts, lengths, positions, query_positions, query_weights, *,
                            pool_size: int = 1, scale=None):
    """`window_scores` computed densely: softmax over each query's visible slots, weighted, summed
    over the window and the query group, then average-pooled within each segment."""
    del values
    batch, window, heads, dim = q.shape
    kv_heads = starts.shape[1]
    scale = dim ** -0.5 if scale is None else scale
    slots = jnp.arange(keys.shape[1])
    inside = segment_mask(starts, lengths, keys.shape[1])  # [B, Hkv, N]
    owner_inside = jnp.repeat(inside, heads // kv_heads, axis=1)  # [B, H, N]
    visible = owner_inside[:, :, None, :] & (positions[:, None, None, :] <= query_positions[:, None, :, None])
    scores = jnp.einsum("bwhd,bnd->bhwn", q, keys, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(visible, scores, -jnp.inf)
    probs = jnp.where(visible, jax.nn.softmax(scores, axis=-1), 0.0)  # rows that see nothing: NaN -> 0
    mass = jnp.einsum("bhwn,bw->bn", probs, query_weights.astype(jnp.float32))
    if pool_size == 1:
        return mass
    slot_owner_first = jnp.sum(jnp.where(inside, starts[:, :, None], 0), axis=1)
    slot_owner_last = jnp.sum(jnp.where(inside, (starts + lengths)[:, :, None] - 1, 0), axis=1)
    offsets = jnp.arange(pool_size) - pool_size // 2
    neighbours = slots[:, None] + offsets  # [N, P]
    ok = ((neighbours[None] >= slot_owner_first[..., None]) & (neighbours[None] <= slot_owner_last[..., None]))
    gathered = jnp.take_along_axis(mass[:, :, None], jnp.clip(neighbours, 0, keys.shape[1] - 1)[None], axis=1)
    return jnp.where(inside.any(axis=1), jnp.sum(jnp.where(ok, gathered, 0.0), axis=-1) / pool_size, 0.0)
