"""Per-key attention mass in dense jnp: the oracle the kernel is tested against.

Builds the full `[B, H, T, N]` probabilities, so it is for tests and small shapes only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import segment_mask


def key_mass_reference(q: jax.Array, keys: jax.Array, starts: jax.Array, lengths: jax.Array,
                       positions: jax.Array, query_positions: jax.Array, query_weights: jax.Array,
                       lse: jax.Array, *, scale: float | None = None) -> jax.Array:
    """`mass[b, n] = sum_t w[b, t] * sum_j exp(q[b, t, j] . keys[b, n] * scale - lse[b, j, t])`.

    The sum runs over the query heads j of the KV head that owns slot n and over the queries t that
    see it (`positions[b, n] <= query_positions[b, t]`); queries with `lse = -inf` or weight 0 add
    nothing and slots in no segment get 0. Shapes as in `pallas_kernels.key_mass.key_mass`.
    """
    heads, head_dim = q.shape[2:]
    slots = keys.shape[1]
    group = heads // starts.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    owned = segment_mask(starts, lengths, slots)                                             # [B, Hkv, N]
    owned = jnp.repeat(owned, group, axis=1)                                                 # [B, H, N]
    causal = positions[:, None, :] <= query_positions[:, :, None]                            # [B, T, N]
    alive = jnp.isfinite(lse) & (query_weights[:, None, :] != 0)                             # [B, H, T]
    visible = owned[:, :, None, :] & causal[:, None] & alive[..., None]                      # [B, H, T, N]
    scores = jnp.einsum("bthd,bnd->bhtn", q.astype(jnp.float32), keys.astype(jnp.float32),
                        precision=lax.Precision.HIGHEST) * scale
    probs = jnp.where(visible, jnp.exp(scores - jnp.where(alive, lse, 0.0)[..., None]), 0.0)
    return jnp.einsum("bhtn,bt->bn", probs, query_weights.astype(jnp.float32), precision=lax.Precision.HIGHEST)
