"""Per-key attention mass: the softmax probability each cache slot receives, summed over queries.

The statistic behind attention-based eviction: SnapKV (arXiv:2404.14469) sums the attention that
an observation window of the last queries pays to each key, H2O (arXiv:2306.14048) accumulates it
over all queries, A2SF weighs it by a decay of the query's age and TOVA takes the last query's.
`key_mass` computes it from the queries, the cache pool and each query row's log-sum-exp (which the
flash prefill pass already has), without writing the T x N probabilities anywhere.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import (check_block_size, check_dtypes, check_int, check_pool, check_shape,
                                   resolve_backend, resolve_max_segment)
from pallas_kernels.key_mass.kernel import key_mass_pallas
from pallas_kernels.key_mass.reference import key_mass_reference

__all__ = ["key_mass", "key_mass_reference"]

# Per backend: the smallest block (a GPU dot needs 16 rows, a TPU lane tile 128) and the default
# caps for block_q (query rows) and block_k (keys).
_BLOCKS = {"gpu": (16, 64, 64), "tpu": (128, 256, 512)}

_key_mass = jax.jit(key_mass_pallas, static_argnames=("scale", "max_segment", "block_q", "block_k", "backend",
                                                     "interpret"))


def _default_block(size: int, smallest: int, cap: int) -> int:
    return min(cap, max(smallest, pl.next_power_of_2(size)))


def key_mass(q, keys, starts, lengths, positions, query_positions, query_weights, lse, *, scale=None,
             max_segment=None, block_q=None, block_k=None, backend=None, interpret=None) -> jax.Array:
    """Attention mass per cache slot, summed over weighted queries and the query heads of its KV head.

    q [B, T, H, D]; keys [B, N, D] (a pool, see `pallas_kernels.common`); starts, lengths [B, Hkv];
    positions [B, N]; query_positions, query_weights [B, T]; lse [B, H, T] float32 (each query row's
    log-sum-exp over its visible keys, -inf where it sees none). Query t of head j sees slot n iff n
    is in the segment of KV head j // G (G = H // Hkv) and `positions[b, n] <= query_positions[b, t]`.

    Returns mass [B, N] float32:
    `mass[b, n] = sum_t query_weights[b, t] * sum_{j in group of owner(n)} exp(q[b,t,j].k[b,n]*scale - lse[b,j,t])`
    over visible (t, j); 0 for slots in no segment (whatever they hold). Queries with lse = -inf or
    weight 0 add nothing. The lse is used as given, not recomputed.

    scale defaults to D ** -0.5. max_segment (static, an int in [1, N]; None means N) is the most
    slots any segment holds: lengths must not exceed it (the entries of a segment past its first
    max_segment slots are ignored), and it bounds the key blocks of the grid. block_q counts query
    rows (a row is one token of one query head; the G query heads of a KV head are folded into
    T * G rows) and block_k keys, both powers of two, at least 16 on GPU and 128 on TPU; by default
    the next power of two of T * G and max_segment, capped at 64 and 64 on GPU, 256 and 512 on TPU.
    Query positions that do not decrease along T (end-aligned chunks, front padding repeating a
    position) let every row block that sees none of a key block be skipped; others give the same
    result with less skipping. backend and interpret as in `pallas_kernels.common.resolve_backend`.
    """
    backend, interpret = resolve_backend(backend, interpret)
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, H, D], got shape {tuple(q.shape)}.")
    batch, slots, kv_heads, head_dim = check_pool(keys, keys, starts, lengths, positions)  # values are not read
    tokens, heads = q.shape[1:3]
    check_shape("q", q, (batch, tokens, heads, head_dim), "the queries [B, T, H, D] with the keys' batch and head dim")
    if heads % kv_heads:
        raise ValueError(f"q's {heads} query heads must be a multiple of the {kv_heads} KV heads of starts "
                         f"and lengths (grouped-query attention).")
    check_dtypes(q=q, keys=keys)
    check_shape("query_positions", query_positions, (batch, tokens), "each query's token position")
    check_int("query_positions", query_positions)
    check_shape("query_weights", query_weights, (batch, tokens), "each query's weight (0 for padding)")
    if not jnp.issubdtype(query_weights.dtype, jnp.floating):
        raise ValueError(f"query_weights must be floating point, got dtype {query_weights.dtype}.")
    check_shape("lse", lse, (batch, heads, tokens), "each query row's log-sum-exp, [B, H, T]")
    if lse.dtype != jnp.float32:
        raise ValueError(f"lse must be float32, got dtype {lse.dtype}; cast it with lse.astype(jnp.float32).")
    max_segment = resolve_max_segment(max_segment, slots)
    smallest, cap_q, cap_k = _BLOCKS[backend]
    block_q = _default_block(tokens * (heads // kv_heads), smallest, cap_q) if block_q is None else block_q
    block_k = _default_block(max_segment, smallest, cap_k) if block_k is None else block_k
    check_block_size("block_q", block_q, smallest)
    check_block_size("block_k", block_k, smallest)
    scale = head_dim ** -0.5 if scale is None else float(scale)
    return _key_mass(q, keys, starts, lengths, positions, query_positions, query_weights, lse, scale=scale,
                     max_segment=int(max_segment), block_q=int(block_q), block_k=int(block_k), backend=backend,
                     interpret=interpret)
