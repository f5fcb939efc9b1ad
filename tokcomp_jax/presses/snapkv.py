"""SnapKV (Li et al., 2024, arXiv:2404.14469): the attention that the last `window_size` queries
pay to each earlier key, pooled over neighbouring keys, predicts which keys generation needs."""
import jax
import jax.numpy as jnp

from tokcomp_jax.attention import attention_mask
from tokcomp_jax.presses.base import Budget, Press, press_factory, scorer_press


def window_attention(layer, obs, window_size: int):
    """Softmax attention `[B, Hkv, G, W, C]` of the chunk's last `window_size` queries over the
    cache (normalised over each query's whole visible row), and which queries are real."""
    queries = obs.queries[:, -window_size:]
    batch, window, heads, dim = queries.shape
    kv_heads = layer.keys.shape[1]
    grouped = queries.reshape(batch, window, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum("bwkgd,bkcd->bkgwc", grouped, layer.keys,
                        preferred_element_type=jnp.float32) * dim ** -0.5
    mask = attention_mask(layer, obs.positions[:, -window_size:])[:, :, None]
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.where(mask, probs, 0.0), obs.valid[:, -window_size:]


def snapkv_scores(layer, obs, window_size: int, kernel_size: int):
    """SnapKV's scores `[B, Hkv, C]`: window attention averaged over the window, average-pooled over
    `kernel_size` neighbouring keys, averaged over each KV head's query group; the window's own
    entries score above all others, the most recent highest (kept first if the budget is smaller
    than the window, where kvpress's equal window scores leave the choice to top-k's tie-breaking)."""
    if obs.queries.shape[1] < window_size:
        raise ValueError(f"SnapKV scoring needs chunks of at least window_size={window_size} tokens; "
                         f"raise chunk_size (got chunks of {obs.queries.shape[1]}).")
    probs, query_valid = window_attention(layer, obs, window_size)
    n_queries = jnp.maximum(jnp.sum(query_valid, axis=1), 1)[:, None, None, None]
    per_key = jnp.sum(probs * query_valid[:, None, None, :, None], axis=3) / n_queries  # [B, Hkv, G, C]
    first_window = jnp.min(jnp.where(query_valid, obs.positions[:, -window_size:], jnp.iinfo(jnp.int32).max),
                           axis=1)[:, None, None]
    in_window = layer.positions >= first_window  # [B, Hkv, C]
    outside = layer.valid_mask() & ~in_window
    per_key = jnp.where(outside[:, :, None], per_key, 0.0)
    pooled = jax.lax.reduce_window(per_key, 0.0, jax.lax.add, (1, 1, 1, kernel_size), (1, 1, 1, 1),
                                   [(0, 0), (0, 0), (0, 0), (kernel_size // 2, kernel_size // 2)])
    scores = jnp.mean(pooled / kernel_size, axis=2)  # attention probabilities: in [0, 1]
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
