"""SnapKV (Li et al., 2024, arXiv:2404.14469): the attention that the last `window_size` queries
pay to each earlier key, pooled over neighbouring keys, predicts which keys generation needs."""
import jax.numpy as jnp

from pallas_kernels.common import uniform_starts
from pallas_kernels.window_scores import pool_keys
from tokcomp_jax.presses.base import Budget, Press, press_factory, scorer_press
from tokcomp_jax.presses.scoring import window_mass


def snapkv_scores(layer, obs, window_size: int, kernel_size: int):
    """SnapKV's scores `[B, Hkv, C]`: window attention averaged over the window, average-pooled over
    `kernel_size` neighbouring keys, averaged over each KV head's query group; the window's own
    entries score above all others, the most recent highest (kept first if the budget is smaller
    than the window, where kvpress's equal window scores leave the choice to top-k's tie-breaking)."""
    if obs.queries.shape[1] < window_size:
        raise ValueError(f"SnapKV scoring needs chunks of at least window_size={window_size} tokens; "
                         f"raise chunk_size (got chunks of {obs.queries.shape[1]}).")
    query_valid = obs.valid[:, -window_size:]
    n_queries = jnp.maximum(jnp.sum(query_valid, axis=1, keepdims=True), 1)
    per_key = window_mass(layer, obs, window_size, query_valid / n_queries)  # [B, Hkv, C], summed over the group
    first_window = jnp.min(jnp.where(query_valid, obs.positions[:, -window_size:], jnp.iinfo(jnp.int32).max),
                           axis=1)[:, None, None]
    in_window = layer.positions >= first_window  # [B, Hkv, C]
    outside = layer.valid_mask() & ~in_window
    per_key = jnp.where(outside, per_key, 0.0)
    batch, kv_heads, capacity = per_key.shape
    pooled = pool_keys(per_key.reshape(batch, kv_heads * capacity), uniform_starts(batch, kv_heads, capacity),
                       jnp.full((batch, kv_heads), capacity), kernel_size).reshape(per_key.shape)
    scores = pooled / (obs.queries.shape[2] // kv_heads)  # attention probabilities: in [0, 1]
    recency = layer.positions / (jnp.max(layer.positions) + 1.0)
    return jnp.where(in_window, 2.0 + recency, scores)


@press_factory
def snapkv(ratio: float | None = None, *, tokens: int | None = None, window_size: int = 64,
           kernel_size: int = 5) -> Press:
    """SnapKV's scores (`snapkv_scores`) and top-k selection within the budget; the window itself is
    always kept (kvpress `SnapKVPress`: window_size=64, kernel_size=5)."""
    if window_size < 1 or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"window_size must be >= 1 and kernel_size odd, got {window_size}, {kernel_size}.")
    return scorer_press(lambda layer, obs, state: snapkv_scores(layer, obs, window_size, kernel_size),
                        Budget(ratio, tokens))
