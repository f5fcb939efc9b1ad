"""Prefill attention over a cache pool: FlashAttention-2 (Dao, 2023) with GQA rows and causal skipping.

The G query heads of a KV head are folded into the rows of a query block (row r of the block is token
r // G, head r % G; for Triton G is padded to a power of two), so each key/value block is read once for
the whole group. Keys are visited only up to `stops[b, h, i]`, the slot after the last key of the
head's segment visible to block i's latest query: the pool keeps a segment's positions ascending, so
the keys a query sees are a prefix of the segment, found by a binary search (`visible_stops`). Inside a
block each score is masked by slot range and position and masked values are zeroed, so free slots may
hold anything, even NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

_NT = (((1,), (1,)), ((), ()))  # q @ k.T
_NN = (((1,), (0,)), ((), ()))  # p @ v


def visible_stops(starts: jax.Array, lengths: jax.Array, positions: jax.Array, block_positions: jax.Array,
                  max_segment: int) -> jax.Array:
    """`[B, Hkv, Q]`: one past the last slot of each head's segment at a position <= `block_positions`.

    starts, lengths `[B, Hkv]` (lengths <= max_segment); positions `[B, N]` (ascending within a
    segment); block_positions `[B, Q]`, the latest query position of each query block. A binary
    search per (row, head, block).
    """
    slots = positions.shape[1]
    lo = jnp.zeros(starts.shape + block_positions.shape[1:], jnp.int32)
    hi = jnp.broadcast_to(lengths[..., None], lo.shape)

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) // 2
        slot = jnp.clip(starts[..., None] + mid, 0, slots - 1).reshape(starts.shape[0], -1)
        seen = jnp.take_along_axis(positions, slot, axis=1).reshape(lo.shape) <= block_positions[:, None, :]
        open_ = lo < hi
        return jnp.where(open_ & seen, mid + 1, lo), jnp.where(open_ & ~seen, mid, hi)

    count, _ = lax.fori_loop(0, max_segment.bit_length() + 1, halve, (lo, hi))
    return jnp.minimum(starts[..., None] + count, slots)  # an empty head's stop is its start


def _scores(q: jax.Array, k: jax.Array, scale: float, visible: jax.Array) -> jax.Array:
    """Scaled float32 scores `[rows, block_k]`, -inf where not visible (NaN keys included)."""
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
    return jnp.where(visible, s, -jnp.inf)


def _online_softmax(s, v, m_prev, l_prev, acc_prev):
    """One FlashAttention-2 update: scores s `[rows, bk]`, values v `[bk, D]`, m, l `[rows, 1]`, acc `[rows, D]`."""
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # a row that has seen nothing keeps p = 0
    p = jnp.exp(s - m_safe)
    alpha = jnp.exp(m_prev - m_safe)
    l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    acc_next = alpha * acc_prev + lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
    return m_next, l_next, acc_next


def _finish(m, l, acc):
    """Normalized output `[rows, D]` and log-sum-exp `[rows, 1]`; rows that saw no key get 0 and -inf."""
    seen = l > 0
    return acc / jnp.where(seen, l, 1.0), jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def _gpu_kernel(starts_ref, stops_ref, q_ref, row_pos_ref, k_ref, v_ref, pos_ref, out_ref, lse_ref, *,
                scale: float, block_k: int):
    """Grid (B, Hkv, query blocks); a loop over the key blocks from the segment's start to its stop."""
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, stop = starts_ref[b, h], stops_ref[b, h, i]
    q = q_ref[...]  # [rows, D]
    rows, head_dim = q.shape
    row_pos = row_pos_ref[...][:, None]  # [rows, 1]

    def body(j, carry):
        first = start + j * block_k
        slot = first + jnp.arange(block_k)
        in_range = slot < stop  # [bk]; slot >= start by construction
        k = plgpu.load(k_ref.at[pl.ds(first, block_k), :], mask=in_range[:, None], other=0.0)
        v = plgpu.load(v_ref.at[pl.ds(first, block_k), :], mask=in_range[:, None], other=0.0)
        pos = plgpu.load(pos_ref.at[pl.ds(first, block_k)], mask=in_range, other=0)
        visible = in_range[None, :] & (pos[None, :] <= row_pos)
        return _online_softmax(_scores(q, k, scale, visible), v, *carry)

    init = (jnp.full((rows, 1), -jnp.inf, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))
    out, lse = _finish(*lax.fori_loop(0, lax.div(stop - start + block_k - 1, block_k), body, init))
    out_ref[...] = out.astype(out_ref.dtype)
    lse_ref[...] = lse[:, 0]


def prefill_attention_gpu(q_rows: jax.Array, row_positions: jax.Array, keys: jax.Array, values: jax.Array,
                          positions: jax.Array, starts: jax.Array, stops: jax.Array, *, scale: float,
                          rows: int, block_k: int, interpret) -> tuple[jax.Array, jax.Array]:
    """Pallas Triton kernel. q_rows `[B, Hkv, R, D]`, row_positions `[B, R]`, stops `[B, Hkv, R // rows]`.

    Returns (out `[B, Hkv, R, D]`, lse `[B, Hkv, R]` float32).
    """
    batch, kv_heads, total_rows, head_dim = q_rows.shape
    slots = keys.shape[1]
    kernel = functools.partial(_gpu_kernel, scale=scale, block_k=block_k)
    whole = pl.BlockSpec()
    pool = pl.BlockSpec((None, slots, head_dim), lambda b, h, i: (b, 0, 0))
    return pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, total_rows // rows),
        in_specs=[
            whole, whole,
            pl.BlockSpec((None, None, rows, head_dim), lambda b, h, i: (b, h, i, 0)),
            pl.BlockSpec((None, rows), lambda b, h, i: (b, i)),
            pool, pool,
            pl.BlockSpec((None, slots), lambda b, h, i: (b, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, rows, head_dim), lambda b, h, i: (b, h, i, 0)),
            pl.BlockSpec((None, None, rows), lambda b, h, i: (b, h, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q_rows.shape, q_rows.dtype),
                   jax.ShapeDtypeStruct(q_rows.shape[:3], jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2),
        interpret=interpret,
        name="prefill_attention",
    )(starts, stops, q_rows, row_positions, keys, values, positions)


def _key_blocks(starts_ref, stops_ref, b, h, i, *, kv_heads: int, num_q_blocks: int, block_k: int,
                num_blocks: int):
    """A (row, KV head, query block)'s visible slots [start, stop), first key block and number of blocks."""
    start = starts_ref[b * kv_heads + h]
    stop = stops_ref[(b * kv_heads + h) * num_q_blocks + i]
    first = jnp.minimum(lax.div(jnp.maximum(start, 0), block_k), num_blocks - 1)  # lax.div: Mosaic has no floor
    return start, stop, first, jnp.where(stop > start, lax.div(jnp.maximum(stop - 1, 0), block_k) - first + 1, 0)


def _tpu_kernel(starts_ref, stops_ref, q_ref, row_pos_ref, k_ref, v_ref, pos_ref, out_ref, lse_ref,
                m_ref, l_ref, acc_ref, *, scale: float, block_k: int, key_blocks):
    """Grid (B, Hkv, query blocks, key blocks); key blocks past the segment's stop are skipped."""
    j = pl.program_id(3)
    start, stop, first, count = key_blocks(starts_ref, stops_ref, pl.program_id(0), pl.program_id(1),
                                           pl.program_id(2))

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(j < count)
    def _step():
        block_start = (first + j) * block_k  # the first block may hold the previous head's slots
        slot_row = block_start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        slot_col = block_start + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
        in_range = (slot_row >= start) & (slot_row < stop)  # [1, bk]
        visible = in_range & (pos_ref[...] <= row_pos_ref[...])  # [rows, bk]
        v = jnp.where((slot_col >= start) & (slot_col < stop), v_ref[...], 0)
        s = _scores(q_ref[...], k_ref[...], scale, visible)
        m_ref[...], l_ref[...], acc_ref[...] = _online_softmax(s, v, m_ref[...], l_ref[...], acc_ref[...])

    @pl.when(j == pl.num_programs(3) - 1)
    def _store():
        out, lse = _finish(m_ref[...], l_ref[...], acc_ref[...])
        out_ref[...] = out.astype(out_ref.dtype)
        lse_ref[...] = lse


def prefill_attention_tpu(q_rows: jax.Array, row_positions: jax.Array, keys: jax.Array, values: jax.Array,
                          positions: jax.Array, starts: jax.Array, stops: jax.Array, *, scale: float,
                          rows: int, block_k: int, max_segment: int, interpret) -> tuple[jax.Array, jax.Array]:
    """Mosaic kernel, same arguments and returns as `prefill_attention_gpu`; no stop is more than
    max_segment slots past its start.

    starts and stops are prefetched into SMEM; the key/value index maps clamp a skipped block onto
    the last needed one, so the pipeline issues no DMA for it and `pl.when` skips its compute. The
    key-block axis spans the most pool blocks max_segment slots can touch, wherever they start.
    """
    batch, kv_heads, total_rows, head_dim = q_rows.shape
    slots = keys.shape[1]
    num_q_blocks, num_blocks = total_rows // rows, pl.cdiv(slots, block_k)
    segment_blocks = min(num_blocks, pl.cdiv(max_segment - 1, block_k) + 1)

    key_blocks = functools.partial(_key_blocks, kv_heads=kv_heads, num_q_blocks=num_q_blocks, block_k=block_k,
                                   num_blocks=num_blocks)

    def key_block(b, h, i, j, starts_ref, stops_ref):
        _, _, first, count = key_blocks(starts_ref, stops_ref, b, h, i)
        return jnp.minimum(first + jnp.minimum(j, jnp.maximum(count - 1, 0)), num_blocks - 1)

    def pool_map(b, h, i, j, *refs):
        return b, key_block(b, h, i, j, *refs), 0

    def positions_map(b, h, i, j, *refs):
        return b, 0, key_block(b, h, i, j, *refs)

    def rows_map(b, h, i, j, *_):
        return b, h, i, 0

    kernel = functools.partial(_tpu_kernel, scale=scale, block_k=block_k, key_blocks=key_blocks)
    pool = pl.BlockSpec((None, block_k, head_dim), pool_map)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(batch, kv_heads, num_q_blocks, segment_blocks),
        in_specs=[
            pl.BlockSpec((None, None, rows, head_dim), rows_map),
            pl.BlockSpec((None, rows, 1), lambda b, h, i, j, *_: (b, i, 0)),
            pool, pool,
            pl.BlockSpec((None, 1, block_k), positions_map),
        ],
        out_specs=[
            pl.BlockSpec((None, None, rows, head_dim), rows_map),
            pl.BlockSpec((None, None, rows, 1), rows_map),
        ],
        scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                        pltpu.VMEM((rows, head_dim), jnp.float32)],
    )
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(q_rows.shape, q_rows.dtype),
                   jax.ShapeDtypeStruct((*q_rows.shape[:3], 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="prefill_attention",
    )(starts.reshape(-1), stops.reshape(-1), q_rows, row_positions[..., None], keys, values, positions[:, None, :])
    return out, lse[..., 0]
