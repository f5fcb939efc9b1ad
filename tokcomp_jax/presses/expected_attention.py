"""Expected Attention (Devoto et al., 2025, arXiv:2510.00636): the attention that *future* queries
will pay to each key, estimated in closed form from a Gaussian model of the queries.

The pre-RoPE queries of the prompt are modelled as a Gaussian `N(mu, Sigma)` per query head; the
RoPE rotation of the next `n_future_positions` positions is averaged into one matrix `R`, so the
future queries are `N(R mu, R Sigma R^T)`. For a key `k`, `E[exp(q.k / sqrt(d))]` is
`exp(mu'.k / sqrt(d) + k^T Sigma' k / (2 d))` (the Gaussian moment-generating function); its softmax
over the keys, averaged over the KV head's query group and rescaled by the value norm, scores the
entry. The first `n_sink` tokens (attention sinks) are always kept and left out of the statistics.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from tokcomp_jax.presses.base import Budget, Press, press_factory, scorer_press


class QueryStatistics(NamedTuple):
    """Running statistics of one layer's pre-RoPE queries, per row and query head (Chan et al.'s
    parallel update: merging chunks needs no second pass and keeps the covariance accurate).

    count: `[B]` tokens observed; mean: `[B, H, D]`; scatter: `[B, H, D, D]` the sum of the outer
    products of the centred queries (the covariance times `count`); float32 whatever the model's dtype.
    """

    count: Float[Array, "B"]
    mean: Float[Array, "B H D"]
    scatter: Float[Array, "B H D D"]


def observe_queries(stats: QueryStatistics | None, queries: Float[Array, "B T H D"],
                    weights: Float[Array, "B T"]) -> QueryStatistics:
    """Merges the chunk's queries (those with weight 1) into `stats` (None: nothing seen yet)."""
    queries = queries.astype(jnp.float32)
    batch, _, heads, dim = queries.shape
    if stats is None:
        stats = QueryStatistics(jnp.zeros((batch,), jnp.float32), jnp.zeros((batch, heads, dim), jnp.float32),
                                jnp.zeros((batch, heads, dim, dim), jnp.float32))
    n_chunk = jnp.sum(weights, axis=1)  # [B]
    chunk_mean = jnp.einsum("bt,bthd->bhd", weights, queries) / jnp.maximum(n_chunk, 1.0)[:, None, None]
    centred = (queries - chunk_mean[:, None]) * weights[:, :, None, None]
    chunk_scatter = jnp.einsum("bthi,bthj->bhij", centred, centred)
    count = stats.count + n_chunk
    share = (n_chunk / jnp.maximum(count, 1.0))[:, None, None]  # n_chunk / n
    delta = chunk_mean - stats.mean
    mean = stats.mean + delta * share
    cross = (stats.count * share[:, 0, 0])[:, None, None, None]  # n_seen * n_chunk / n
    scatter = stats.scatter + chunk_scatter + cross * jnp.einsum("bhi,bhj->bhij", delta, delta)
    return QueryStatistics(count, mean, scatter)


def average_rotation(start: Int[Array, "B"], n_positions: int, inv_freq: np.ndarray) -> Float[Array, "B D D"]:
    """The RoPE rotation (half-split layout, as HF's `rotate_half`) averaged over positions
    `start, ..., start + n_positions - 1` of each row: `[[C, -S], [S, C]]` with C, S the mean
    cosines and sines."""
    future = start[:, None] + jnp.arange(n_positions)  # [B, N]
    angles = future[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)  # [B, N, D/2]
    cos, sin = jnp.mean(jnp.cos(angles), axis=1), jnp.mean(jnp.sin(angles), axis=1)  # [B, D/2]
    eye = jnp.eye(cos.shape[-1], dtype=jnp.float32)
    cos_d, sin_d = cos[..., None] * eye, sin[..., None] * eye
    return jnp.concatenate([jnp.concatenate([cos_d, -sin_d], axis=-1),
                            jnp.concatenate([sin_d, cos_d], axis=-1)], axis=-2)


@press_factory
def expected_attention(ratio: float | None = None, *, tokens: int | None = None, n_future_positions: int = 512,
                       n_sink: int = 4, use_covariance: bool = True, use_vnorm: bool = True,
                       epsilon: float = 0.0) -> Press:
    """Expected Attention (Devoto et al., 2025, arXiv:2510.00636), as kvpress `ExpectedAttentionPress`
    (n_future_positions=512, n_sink=4, use_covariance=True, use_vnorm=True, epsilon=0.0).

    The mean and (biased) covariance of each query head's pre-RoPE queries over the prompt's tokens
    from position `n_sink` on are accumulated chunk by chunk (padding ignored), so the selection does
    not depend on the prefill chunk size. They are rotated by the RoPE rotation averaged over the
    `n_future_positions` positions that follow each row's prompt; each entry past the sinks scores
    `softmax_k(mu'.k / sqrt(d) + k^T Sigma' k / (2 d))` (covariance term only with `use_covariance`),
    averaged over the KV head's query group, then `(score + epsilon) * ||v||` with `use_vnorm`.
    Entries at positions below `n_sink` are always kept (earliest first if the budget is smaller).

    kvpress compresses only a prefill into an empty cache, where its "first n_sink tokens / keys" and
    "q_len" are the positions below n_sink and the prompt length; here they are read from the
    positions, per row, which is the same there and also defined for a prefill after earlier tokens.
    """
    if n_future_positions < 1 or n_sink < 0:
        raise ValueError(f"n_future_positions must be >= 1 and n_sink >= 0, got {n_future_positions}, {n_sink}.")
    budget = Budget(ratio, tokens)

    def observe(stats, layer, obs):
        weights = (obs.valid & (obs.positions >= n_sink)).astype(jnp.float32)
        return observe_queries(stats, obs.pre_rope_queries, weights)

    def score(layer, obs, stats):
        keys = layer.keys.astype(jnp.float32)
        batch, kv_heads, _, dim = keys.shape
        heads = stats.mean.shape[1]
        # Rows are aligned to the end: every row's last token is the chunk's last one.
        rotation = average_rotation(obs.positions[:, -1] + 1, n_future_positions, obs.inv_freq)  # [B, D, D]
        mean = jnp.einsum("bij,bhj->bhi", rotation, stats.mean).reshape(batch, kv_heads, heads // kv_heads, dim)
        logits = jnp.einsum("bkgd,bkcd->bkgc", mean, keys) / np.sqrt(dim)
        if use_covariance:
            cov = stats.scatter / jnp.maximum(stats.count, 1.0)[:, None, None, None]
            cov = jnp.einsum("bij,bhjl,bml->bhim", rotation, cov, rotation)
            cov = cov.reshape(batch, kv_heads, heads // kv_heads, dim, dim)
            logits += jnp.einsum("bkci,bkgij,bkcj->bkgc", keys, cov, keys) / dim / 2
        valid = layer.valid_mask()  # [B, Hkv, C]
        sink = valid & (layer.positions < n_sink)
        scored = valid & ~sink
        logits = jnp.where(scored[:, :, None], logits, -jnp.inf)
        peak = jnp.max(logits, axis=-1, keepdims=True)
        weights = jnp.where(scored[:, :, None], jnp.exp(logits - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
        probs = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
        scores = jnp.mean(probs, axis=2)  # [B, Hkv, C]
        if use_vnorm:
            scores = (scores + epsilon) * jnp.linalg.norm(layer.values.astype(jnp.float32), axis=-1)
        # Sinks above every other entry, the earliest first (kvpress: max score + 1 for all of them).
        sink_scores = jnp.finfo(jnp.float32).max / (1.0 + layer.positions.astype(jnp.float32))
        return jnp.where(sink, sink_scores, scores)

    return scorer_press(score, budget, observe=observe)
