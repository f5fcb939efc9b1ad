"""Prefill (chunk) attention over a layer's cache pool, returning the output and every query's log-sum-exp.

The T new queries attend causally, by token position, to their KV head's segment of the pool (which
already holds the chunk's own keys). See `kernel.py` for the kernel and `reference.py` for the oracle.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import (check_block_size, check_dtypes, check_int, check_pool, check_shape,
                                   resolve_backend, resolve_max_segment)
from pallas_kernels.prefill_attention.kernel import prefill_attention_gpu, prefill_attention_tpu, visible_stops
from pallas_kernels.prefill_attention.reference import prefill_attention_reference

__all__ = ["prefill_attention", "prefill_attention_reference"]

# Rows of a query block (tokens x heads of a group; halved for D = 256) and keys of a key block.
_TARGET_ROWS = {"gpu": 128, "tpu": 512}
_BLOCK_K = {"gpu": 64, "tpu": 512}
# Smallest rows and key block: Triton's dot takes dims >= 16; Mosaic tiles are 8 x 128.
_MIN_ROWS = {"gpu": 16, "tpu": 8}
_MIN_BLOCK_K = {"gpu": 16, "tpu": 128}


def _default_block(size: int, cap: int, minimum: int) -> int:
    """The power of two nearest above `size`, within [minimum, cap]."""
    return max(minimum, min(cap, pl.next_power_of_2(size)))


def prefill_attention(q: jax.Array, keys: jax.Array, values: jax.Array, starts: jax.Array, lengths: jax.Array,
                      positions: jax.Array, query_positions: jax.Array, *, scale: float | None = None,
                      max_segment: int | None = None, block_q: int | None = None, block_k: int | None = None,
                      backend: str | None = None, interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """Causal attention of T new queries over each KV head's segment of the pool (FlashAttention-2).

    q `[B, T, H, D]`; keys, values `[B, N, D]`; starts, lengths `[B, Hkv]`; positions `[B, N]`;
    query_positions `[B, T]`. Query t of head j sees the slots of KV head j // (H // Hkv) whose
    position is <= `query_positions[b, t]`. Returns (out `[B, T, H, D]` in q's dtype, lse `[B, H, T]`
    float32); a query that sees no key gets out = 0 and lse = -inf. scale defaults to D ** -0.5; scores
    and softmax are float32. max_segment (static, an int in [1, N]; None means N) is the most slots
    any segment holds: lengths must not exceed it (the entries of a segment past its first
    max_segment slots are ignored), and it bounds the TPU grid's key blocks and the search for each
    query block's last visible key. block_q counts tokens (a block holds block_q x H // Hkv rows),
    block_k slots; both default from T, max_segment and the backend ("gpu": Pallas Triton, "tpu": Mosaic).
    """
    batch, slots, kv_heads, head_dim = check_pool(keys, values, starts, lengths, positions)
    if q.ndim != 4 or q.shape[0] != batch or q.shape[3] != head_dim or q.shape[1] < 1:
        raise ValueError(f"q must be [B, T, H, D] with T >= 1 and the pool's B = {batch} and D = {head_dim}, "
                         f"got shape {tuple(q.shape)}.")
    steps, heads = q.shape[1], q.shape[2]
    if heads % kv_heads:
        raise ValueError(f"q's {heads} heads must be a multiple of the pool's {kv_heads} KV heads "
                         f"(starts/lengths [B, Hkv]); pass one start and length per KV head.")
    check_dtypes(q=q, keys=keys, values=values)
    check_shape("query_positions", query_positions, (batch, steps), "each query's token position")
    check_int("query_positions", query_positions)
    backend, interpret = resolve_backend(backend, interpret)
    max_segment = resolve_max_segment(max_segment, slots)

    group = heads // kv_heads
    group_pad = pl.next_power_of_2(group) if backend == "gpu" else group  # Triton blocks are powers of two
    min_block_q = max(1, _MIN_ROWS[backend] // group_pad)
    if block_q is None:
        target_rows = _TARGET_ROWS[backend] // (2 if head_dim > 128 else 1)
        block_q = _default_block(steps, max(min_block_q, target_rows // pl.next_power_of_2(group)), min_block_q)
    if block_k is None:
        block_k = _default_block(max_segment, _BLOCK_K[backend], _MIN_BLOCK_K[backend])
    check_block_size("block_q", block_q, min_block_q)
    check_block_size("block_k", block_k, _MIN_BLOCK_K[backend])
    scale = float(head_dim ** -0.5 if scale is None else scale)
    return _prefill_attention(q, keys, values, starts, lengths, positions, query_positions, scale=scale,
                              max_segment=int(max_segment), block_q=int(block_q), block_k=int(block_k),
                              group_pad=group_pad, backend=backend, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("scale", "max_segment", "block_q", "block_k", "group_pad", "backend",
                                             "interpret"))
def _prefill_attention(q, keys, values, starts, lengths, positions, query_positions, *, scale, max_segment, block_q,
                       block_k, group_pad, backend, interpret):
    """Folds each KV head's query heads into rows, bounds the key blocks and runs the kernel."""
    batch, steps, heads, head_dim = q.shape
    kv_heads = starts.shape[1]
    group = heads // kv_heads
    pad = -steps % block_q
    padded_steps = steps + pad
    starts, lengths, positions = (x.astype(jnp.int32) for x in (starts, lengths, positions))
    lengths = jnp.minimum(lengths, max_segment)
    # Padding tokens sit at the lowest position: they never raise a block's bound.
    query_positions = jnp.pad(query_positions.astype(jnp.int32), ((0, 0), (0, pad)),
                              constant_values=jnp.iinfo(jnp.int32).min)
    q_rows = jnp.pad(q.reshape(batch, steps, kv_heads, group, head_dim),
                     ((0, 0), (0, pad), (0, 0), (0, group_pad - group), (0, 0)))
    q_rows = q_rows.transpose(0, 2, 1, 3, 4).reshape(batch, kv_heads, padded_steps * group_pad, head_dim)
    row_positions = jnp.repeat(query_positions, group_pad, axis=1)  # [B, R]
    block_positions = jnp.max(query_positions.reshape(batch, -1, block_q), axis=-1)  # [B, T / block_q]
    stops = visible_stops(starts, lengths, positions, block_positions, max_segment)  # [B, Hkv, T / block_q]

    kernel = (functools.partial(prefill_attention_tpu, max_segment=max_segment) if backend == "tpu"
              else prefill_attention_gpu)
    out, lse = kernel(q_rows, row_positions, keys, values, positions, starts, stops, scale=scale,
                      rows=block_q * group_pad, block_k=block_k, interpret=interpret)
    out = out.reshape(batch, kv_heads, padded_steps, group_pad, head_dim)[:, :, :steps, :group]
    lse = lse.reshape(batch, kv_heads, padded_steps, group_pad)[:, :, :steps, :group]
    return (out.transpose(0, 2, 1, 3, 4).reshape(batch, steps, heads, head_dim),
            lse.transpose(0, 1, 3, 2).reshape(batch, heads, steps))
