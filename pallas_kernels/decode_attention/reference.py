"""Dense masked decode attention over a pool of KV slots: the oracle for the kernels."""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common import segment_mask


def decode_attention_reference(q, keys, values, starts, lengths, *, return_probs=False, scale=None):
    """q [B, H, D]; keys, values [B, N, D]; starts, lengths [B, Hkv].

    Returns out [B, H, D] in q's dtype, or (out, probs [B, N] float32): see `decode_attention`.
    """
    batch, heads, head_dim = q.shape
    kv_heads = starts.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    inside = segment_mask(starts, lengths, keys.shape[1])  # [B, Hkv, N]
    qg = q.reshape(batch, kv_heads, heads // kv_heads, head_dim).astype(jnp.float32)
    logits = jnp.einsum("bhgd,bnd->bhgn", qg, keys.astype(jnp.float32), precision="highest") * scale
    logits = jnp.where(inside[:, :, None], logits, -jnp.inf)
    peak = logits.max(axis=-1, keepdims=True)
    e = jnp.where(inside[:, :, None], jnp.exp(logits - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    p = e / jnp.where(total > 0, total, 1.0)  # [B, Hkv, G, N]
    owned = inside.any(axis=1)[..., None]  # free slots may hold NaN
    v = jnp.where(owned, values.astype(jnp.float32), 0.0)
    out = jnp.einsum("bhgn,bnd->bhgd", p, v, precision="highest").reshape(batch, heads, head_dim).astype(q.dtype)
    if not return_probs:
        return out
    return out, p.sum(axis=(1, 2))
