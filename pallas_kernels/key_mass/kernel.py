"""Per-key attention mass as Pallas kernels that run in parallel over key blocks.

A KV head's G query heads are folded into rows (row t * G + g is token t of the group's query head
g). One program holds one block of a KV head's keys and runs over the blocks of rows that can see
it, summing `weight * exp(score - lse)` over the rows into one float32 per key; nothing of size
T x N is written. Key blocks are aligned to the pool (pool block i holds slots
[i * block_k, (i + 1) * block_k)): a segment covers `ceil((starts % block_k + lengths) / block_k)`
of them, the grid covers the most any segment of at most `max_segment` slots can
(`ceil((max_segment - 1) / block_k) + 1`, at most `ceil(N / block_k)`) and programs past their
segment do nothing. Each program writes its own output block of `[B, Hkv, key blocks * block_k]`
(no two programs write the same place) and `_gather_slots` reads every slot back from the program
of the KV head that owns it. A pool block can straddle segments: the columns of another head's or
of free slots (garbage, even NaN) are computed alongside and never read, since every column of
scores and mass depends on its own key only.

Causal skipping: a program starts at the first row block whose largest position reaches its first
key's position (positions ascend within a segment). The blocks are found by a search over the
running maximum of the row blocks' positions, which is exact for any query positions; rows are
end-aligned chunks whose positions do not decrease (front padding repeats a position), so every
row block before the first that can see a key block is skipped.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import segment_mask


def _fold_rows(q, query_positions, query_weights, lse, kv_heads: int, block_q: int):
    """Queries as rows per KV head, padded at the end to a multiple of block_q.

    Returns q_rows [B, Hkv, R, D], row_positions [B, R], row_lse and row_weights [B, Hkv, R], with
    R = ceil(T * G / block_q) * block_q. A row that adds nothing (lse -inf, weight 0, padding) gets
    weight 0, lse 0 and a zero query, so that none of its scores can overflow or be NaN.
    """
    batch, tokens, heads, head_dim = q.shape
    group = heads // kv_heads
    rows = tokens * group
    pad = -rows % block_q
    alive = jnp.isfinite(lse) & (query_weights[:, None, :] != 0)                     # [B, H, T]
    weights = jnp.where(alive, query_weights[:, None, :].astype(jnp.float32), 0.0)
    lse = jnp.where(alive, lse, 0.0)
    q = jnp.where(alive.transpose(0, 2, 1)[..., None], q, jnp.zeros((), q.dtype))    # [B, T, H, D]

    def fold(x):  # [B, H, T] -> [B, Hkv, R]
        x = x.reshape(batch, kv_heads, group, tokens).transpose(0, 1, 3, 2)
        return jnp.pad(x.reshape(batch, kv_heads, rows), ((0, 0), (0, 0), (0, pad)))

    q_rows = q.reshape(batch, tokens, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    q_rows = jnp.pad(q_rows.reshape(batch, kv_heads, rows, head_dim), ((0, 0), (0, 0), (0, pad), (0, 0)))
    row_positions = jnp.pad(jnp.repeat(query_positions, group, axis=1), ((0, 0), (0, pad)), mode="edge")
    return q_rows, row_positions, fold(lse), fold(weights)


def _block_tables(starts, lengths, positions, row_positions, block_q: int, block_k: int, key_blocks: int):
    """What each program needs to know, flattened over (row, KV head, key block), K = key_blocks.

    pool_block [B * Hkv * K]: the pool block the program reads (its segment's last one past the
    segment's end); first_row_block [B * Hkv * K]: the first row block that can see it, the number
    of row blocks (nothing to do) past the segment's end.
    """
    batch, slots = positions.shape
    row_blocks = row_positions.shape[1] // block_q
    ends = starts + lengths
    used = jnp.where(lengths > 0, (ends - 1) // block_k - starts // block_k + 1, 0)          # [B, Hkv]
    index = jnp.arange(key_blocks, dtype=jnp.int32)
    pool_block = starts[..., None] // block_k + jnp.minimum(index, jnp.maximum(used - 1, 0)[..., None])
    pool_block = jnp.minimum(pool_block, pl.cdiv(slots, block_k) - 1)                        # [B, Hkv, K]
    first_slot = jnp.maximum(starts[..., None], pool_block * block_k)
    first_key = jnp.take_along_axis(positions, first_slot.reshape(batch, -1), axis=1, mode="clip")  # [B, Hkv * K]
    reach = lax.cummax(row_positions.reshape(batch, row_blocks, block_q).max(axis=2), axis=1)
    first_row_block = jax.vmap(jnp.searchsorted)(reach, first_key).reshape(pool_block.shape)
    first_row_block = jnp.where(index < used[..., None], first_row_block, row_blocks)
    return pool_block.reshape(-1), first_row_block.reshape(-1).astype(jnp.int32)


def _gather_slots(per_block, starts, lengths, slots: int, block_k: int):
    """[B, Hkv, K * block_k] sums over each head's key blocks -> [B, N], 0 for slots in no segment."""
    batch, _, span = per_block.shape
    slot = jnp.arange(slots, dtype=jnp.int32)
    owned = segment_mask(starts, lengths, slots)                                           # [B, Hkv, N]
    owner = jnp.argmax(owned, axis=1)                                                      # [B, N]
    owner_start = jnp.take_along_axis(starts, owner, axis=1)
    index = owner * span + slot - owner_start // block_k * block_k
    mass = jnp.take_along_axis(per_block.reshape(batch, -1), index, axis=1, mode="clip")
    return jnp.where(owned.any(axis=1), mass, 0.0)


def _gpu_kernel(pool_block_ref, first_row_block_ref, keys_ref, key_positions_ref, q_ref, row_positions_ref,
                lse_ref, weights_ref, out_ref, *, scale, block_q, precision):
    """One (row, KV head, key block): keys [block_k, D] against row blocks [block_q, D] in a loop."""
    cell = (pl.program_id(0) * pl.num_programs(1) + pl.program_id(1)) * pl.num_programs(2) + pl.program_id(2)
    block_k = out_ref.shape[0]
    first_slot = pool_block_ref[cell] * block_k
    in_pool = first_slot + jnp.arange(block_k) < keys_ref.shape[0]  # the last pool block may be partial
    keys = plgpu.load(keys_ref.at[pl.ds(first_slot, block_k), :], mask=in_pool[:, None], other=0.0)
    key_positions = plgpu.load(key_positions_ref.at[pl.ds(first_slot, block_k)], mask=in_pool, other=0)

    def add_row_block(i, mass):
        rows = pl.ds(i * block_q, block_q)
        scores = pl.dot(q_ref[rows, :], keys, trans_b=True, precision=precision) * scale   # [block_q, block_k]
        visible = key_positions[None, :] <= row_positions_ref[rows][:, None]
        probs = jnp.where(visible, jnp.exp(scores - lse_ref[rows][:, None]), 0.0)
        return mass + jnp.sum(probs * weights_ref[rows][:, None], axis=0)

    row_blocks = q_ref.shape[0] // block_q
    out_ref[...] = lax.fori_loop(first_row_block_ref[cell], row_blocks, add_row_block,
                                 jnp.zeros((block_k,), jnp.float32))


def _tpu_kernel(pool_block_ref, first_row_block_ref, keys_ref, key_positions_ref, q_ref, row_positions_ref,
                lse_ref, weights_ref, out_ref, mass_ref, *, scale, precision):
    """One (row, KV head, key block, row block) step; the row blocks are the innermost grid axis.

    Scores are laid out [block_k, block_q] so that the rows' positions, lse and weights are lane
    vectors [1, block_q] and the mass a column [block_k, 1] accumulated in VMEM.
    """
    del pool_block_ref  # read by the index maps only
    cell = (pl.program_id(0) * pl.num_programs(1) + pl.program_id(1)) * pl.num_programs(2) + pl.program_id(2)
    row_block = pl.program_id(3)

    @pl.when(row_block == 0)
    def _():
        mass_ref[...] = jnp.zeros_like(mass_ref)

    @pl.when(row_block >= first_row_block_ref[cell])
    def _():
        scores = lax.dot_general(keys_ref[...], q_ref[...], (((1,), (1,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32) * scale         # [block_k, block_q]
        visible = key_positions_ref[...] <= row_positions_ref[...]
        probs = jnp.where(visible, jnp.exp(scores - lse_ref[...]), 0.0)
        mass_ref[...] += jnp.sum(probs * weights_ref[...], axis=1, keepdims=True)

    @pl.when(row_block == pl.num_programs(3) - 1)
    def _():
        out_ref[...] = mass_ref[...]


def _gpu_call(tables, keys, positions, q_rows, row_positions, row_lse, row_weights, *, scale, precision,
              block_q, block_k, key_blocks, interpret):
    """Pallas Triton: grid (B, Hkv, K); whole rows of the pool and of the queries stay in global memory."""
    batch = keys.shape[0]
    kv_heads = q_rows.shape[1]

    def whole(x):
        return pl.BlockSpec(x.shape, lambda b, h, k: (0,) * x.ndim)

    def per_row(x):
        return pl.BlockSpec((None, *x.shape[1:]), lambda b, h, k: (b,) + (0,) * (x.ndim - 1))

    def per_head(x):
        return pl.BlockSpec((None, None, *x.shape[2:]), lambda b, h, k: (b, h) + (0,) * (x.ndim - 2))

    kernel = functools.partial(_gpu_kernel, scale=scale, block_q=block_q, precision=precision)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, key_blocks * block_k), jnp.float32),
        grid=(batch, kv_heads, key_blocks),
        in_specs=[*map(whole, tables), per_row(keys), per_row(positions), per_head(q_rows),
                  per_row(row_positions), per_head(row_lse), per_head(row_weights)],
        out_specs=pl.BlockSpec((None, None, block_k), lambda b, h, k: (b, h, k)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
    )(*tables, keys, positions, q_rows, row_positions, row_lse, row_weights)


def _tpu_call(tables, keys, positions, q_rows, row_positions, row_lse, row_weights, *, scale, precision,
              block_q, block_k, key_blocks, interpret):
    """Mosaic: grid (B, Hkv, K, row blocks), the tables as scalar prefetch.

    The block index maps read the tables: a program's keys come from its pool block, and row blocks
    before the first that can see it are clamped to that one, so they are neither fetched nor run.
    """
    batch, _, head_dim = keys.shape
    kv_heads, rows = q_rows.shape[1:3]
    row_blocks = rows // block_q

    def cell(b, h, k):
        return (b * kv_heads + h) * key_blocks + k

    def pool_block(b, h, k, i, pool_block_ref, *_):
        return b, pool_block_ref[cell(b, h, k)], 0

    def row_block(b, h, k, i, pool_block_ref, first_row_block_ref, *_):
        return jnp.minimum(jnp.maximum(i, first_row_block_ref[cell(b, h, k)]), row_blocks - 1)

    in_specs = [
        pl.BlockSpec((None, block_k, head_dim), pool_block),
        pl.BlockSpec((None, block_k, 1), pool_block),
        pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, *a: (b, h, row_block(b, h, *a), 0)),
        pl.BlockSpec((None, 1, block_q), lambda b, h, *a: (b, 0, row_block(b, h, *a))),
        pl.BlockSpec((None, None, 1, block_q), lambda b, h, *a: (b, h, 0, row_block(b, h, *a))),
        pl.BlockSpec((None, None, 1, block_q), lambda b, h, *a: (b, h, 0, row_block(b, h, *a))),
    ]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(tables),
        grid=(batch, kv_heads, key_blocks, row_blocks),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, block_k, 1), lambda b, h, k, *_: (b, h, k, 0)),
        scratch_shapes=[pltpu.VMEM((block_k, 1), jnp.float32)],
    )
    kernel = functools.partial(_tpu_kernel, scale=scale, precision=precision)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, key_blocks * block_k, 1), jnp.float32),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(*tables, keys, positions[..., None], q_rows, row_positions[:, None], row_lse[:, :, None],
      row_weights[:, :, None])
    return out[..., 0]


def key_mass_pallas(q, keys, starts, lengths, positions, query_positions, query_weights, lse, *, scale: float,
                    max_segment: int, block_q: int, block_k: int, backend: str, interpret) -> jax.Array:
    """`pallas_kernels.key_mass.key_mass` on checked inputs: fold rows, build tables, run, gather."""
    kv_heads = starts.shape[1]
    starts, lengths, positions, query_positions = (
        x.astype(jnp.int32) for x in (starts, lengths, positions, query_positions))
    lengths = jnp.minimum(lengths, max_segment)
    # The most pool blocks a segment of at most max_segment slots touches, wherever it starts.
    key_blocks = min(pl.cdiv(keys.shape[1], block_k), pl.cdiv(max_segment - 1, block_k) + 1)
    q_rows, row_positions, row_lse, row_weights = _fold_rows(q, query_positions, query_weights, lse, kv_heads,
                                                             block_q)
    tables = _block_tables(starts, lengths, positions, row_positions, block_q, block_k, key_blocks)
    call = _gpu_call if backend == "gpu" else _tpu_call
    per_block = call(tables, keys, positions, q_rows, row_positions, row_lse, row_weights, scale=scale,
                     precision=lax.Precision.HIGHEST if keys.dtype == jnp.float32 else None,
                     block_q=block_q, block_k=block_k, key_blocks=key_blocks, interpret=interpret)
    return _gather_slots(per_block, starts, lengths, keys.shape[1], block_k)
