"""Window scoring (SnapKV, Li et al., 2024, arXiv:2404.14469): the attention that the last W
queries pay to each of the cache's N keys, normalised over each query's whole visible row, weighted
per query, summed over the window and each KV head's query group, optionally average-pooled over
neighbouring keys, without a `[W, N]` matrix in memory.

Two kernels make it: the flash prefill kernel gives each window query's log-sum-exp (or the caller
passes the lse its own attention computed), and the key-mass kernel sums `exp(s - lse)` per key.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import check_shape, segment_mask
from pallas_kernels.key_mass import key_mass
from pallas_kernels.prefill_attention import prefill_attention


def pool_keys(per_slot: jax.Array, starts: jax.Array, lengths: jax.Array, pool_size: int) -> jax.Array:
    """Sum over `pool_size` neighbouring slots of the same segment, divided by `pool_size` (zero
    padding at the segment's ends, as `avg_pool1d(padding=pool_size // 2)`); `[B, N]` -> `[B, N]`,
    0 outside the segments."""
    if pool_size < 1 or pool_size % 2 == 0:
        raise ValueError(f"pool_size must be an odd number of keys >= 1, got {pool_size}.")
    slots = jnp.arange(per_slot.shape[1])
    inside = segment_mask(starts, lengths, per_slot.shape[1])  # [B, Hkv, N]
    values = jnp.where(inside.any(axis=1), per_slot, 0.0)
    if pool_size == 1:
        return values
    first = jnp.sum(jnp.where(inside, starts[:, :, None], 0), axis=1)  # [B, N]: the owner's first slot
    last = jnp.sum(jnp.where(inside, (starts + lengths)[:, :, None] - 1, 0), axis=1)
    half = pool_size // 2
    padded = jnp.pad(values, ((0, 0), (half, half)))
    pooled = jnp.zeros_like(values)
    for offset in range(-half, half + 1):  # exact sums of the neighbours, as a pooling window adds them
        neighbour = slots + offset
        same_segment = (neighbour >= first) & (neighbour <= last)
        pooled += jnp.where(same_segment, padded[:, half + offset:half + offset + values.shape[1]], 0.0)
    return jnp.where(inside.any(axis=1), pooled / pool_size, 0.0)


def window_scores(q, keys, values, starts, lengths, positions, query_positions, query_weights, *, lse=None,
                  pool_size: int = 1, scale=None, max_segment=None, backend=None, interpret=None):
    """`[B, N]` float32 window scores of a cache pool (layout: `pallas_kernels.common`).

    q `[B, W, H, D]` the window's queries; query_positions, query_weights `[B, W]`; lse `[B, H, W]`
    each window query's log-sum-exp over its visible row, computed with the prefill kernel when None.
    max_segment (the most slots any segment holds; lengths must not exceed it) goes to both kernels.
    The result is `key_mass` (see there), then `pool_keys` when `pool_size > 1`.
    """
    if lse is None:
        _, lse = prefill_attention(q, keys, values, starts, lengths, positions, query_positions, scale=scale,
                                   max_segment=max_segment, backend=backend, interpret=interpret)
    else:
        check_shape("lse", lse, (q.shape[0], q.shape[2], q.shape[1]), "[B, H, W] each window query's log-sum-exp")
    mass = key_mass(q, keys, starts, lengths, positions, query_positions, query_weights, lse, scale=scale,
                    max_segment=max_segment, backend=backend, interpret=interpret)
    return pool_keys(mass, starts, lengths, pool_size)
