"""Dense prefill attention over a cache pool in pure jnp: the oracle the kernel is tested against."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import segment_mask


def prefill_attention_reference(q: jax.Array, keys: jax.Array, values: jax.Array, starts: jax.Array,
                                lengths: jax.Array, positions: jax.Array, query_positions: jax.Array, *,
                                scale: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Masked softmax attention of `q [B, T, H, D]` over each KV head's segment of the pool.

    Query t of head j sees the slots of KV head j // G whose position is <= `query_positions[b, t]`.
    Returns (out `[B, T, H, D]` in q's dtype, lse `[B, H, T]` float32); a query that sees no key
    gets out = 0 and lse = -inf. Everything is computed in float32.
    """
    batch, steps, heads, head_dim = q.shape
    kv_heads = starts.shape[1]
    group = heads // kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    in_segment = segment_mask(starts, lengths, keys.shape[1])  # [B, Hkv, N]
    causal = positions[:, None, :] <= query_positions[:, :, None]  # [B, T, N]
    visible = in_segment[:, :, None, None, :] & causal[:, None, None, :, :]  # [B, Hkv, 1, T, N]

    q_bhgtd = q.astype(jnp.float32).reshape(batch, steps, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    scores = jnp.einsum("bhgtd,bnd->bhgtn", q_bhgtd, keys.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) * scale
    scores = jnp.where(visible, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    probs = jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    total = jnp.sum(probs, axis=-1, keepdims=True)
    weights = probs / jnp.where(total > 0, total, 1.0)
    values_bhnd = jnp.where(in_segment[..., None], values[:, None].astype(jnp.float32), 0.0)  # garbage -> 0
    out = jnp.einsum("bhgtn,bhnd->bthgd", weights, values_bhnd, precision=jax.lax.Precision.HIGHEST)
    lse = jnp.where(total > 0, row_max + jnp.log(total), -jnp.inf)[..., 0]  # [B, Hkv, G, T]
    return out.reshape(batch, steps, heads, head_dim).astype(q.dtype), lse.reshape(batch, heads, steps)
