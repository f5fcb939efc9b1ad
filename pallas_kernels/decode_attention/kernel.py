"""Split-K decode attention over a pool of KV slots, for Pallas Triton (GPU) and Mosaic (TPU).

FlashDecoding (Dao et al., "Flash-Decoding for long-context inference", 2023): one program per
(row b, KV head h, split j) attends the query heads of KV head h to the j-th share of the head's
segment with an online softmax (FlashAttention-2) and writes un-normalised partials: `acc`
`[rows, D]`, the running max `m` and sum `l` `[rows, 1]`, all float32. The wrapper combines the
splits exactly by log-sum-exp. A head's G query heads are padded to `rows` (>= 16, a power of two)
so that both dots are matrix products on the tensor cores / the MXU.

The segment of (b, h) is cut into `num_blocks` blocks of `block_k` slots and the splits take
`ceil(num_blocks / num_splits)` blocks each, so work follows the kept tokens, not the pool's size.
Slots outside the segment are masked before either dot: they may hold anything, NaN included.

With `return_logits`, the kernels also write the scaled float32 scores `q.k * scale` of the slots
they visit, from which the wrapper computes each slot's attention probability.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

# Initial running max: finite, so that a split that sees no slot combines with weight exp(-huge) = 0.
NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)
_CONTRACT_LAST = (((1,), (1,)), ((), ()))


def _precision(dtype) -> lax.Precision:
    """Full float32 products for float32 inputs (not TF32 / one bf16 pass); native for 16-bit."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _online_softmax_step(q, k, v, valid_cols, valid_rows, acc, m, l, *, scale):
    """One block of FlashAttention-2: returns the masked scores and the new (acc, m, l).

    q [rows, D]; k, v [block_k, D]; valid_cols [1, block_k] and valid_rows [block_k, 1] mark the
    slots of the segment; acc [rows, D], m, l [rows, 1] float32.
    """
    precision = _precision(q.dtype)
    s = lax.dot_general(q, k, _CONTRACT_LAST, precision=precision, preferred_element_type=jnp.float32) * scale
    s = jnp.where(valid_cols, s, -jnp.inf)  # [rows, block_k]
    m_next = jnp.maximum(m, s.max(axis=1, keepdims=True))
    alpha = jnp.exp(m - m_next)
    p = jnp.exp(s - m_next)
    v = jnp.where(valid_rows, v, jnp.zeros_like(v))  # 0 * NaN garbage would poison the sum.
    pv = jnp.dot(p.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32)
    return s, (acc * alpha + pv, m_next, l * alpha + p.sum(axis=1, keepdims=True))


def _partial_shapes(batch, kv_heads, num_splits, rows, head_dim):
    return [
        jax.ShapeDtypeStruct((batch, kv_heads, num_splits, rows, head_dim), jnp.float32),  # acc
        jax.ShapeDtypeStruct((batch, kv_heads, num_splits, rows, 1), jnp.float32),  # m
        jax.ShapeDtypeStruct((batch, kv_heads, num_splits, rows, 1), jnp.float32),  # l
    ]


# --------------------------------------------------------------------------------------- GPU


def _gpu_kernel(starts_ref, lengths_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *logits_ref,
                block_k: int, num_splits: int, group: int, scale: float):
    """Program (b, h, j): blocks [j * per_split, (j + 1) * per_split) of the segment, counted from its start.

    starts_ref, lengths_ref []; q_ref [rows, D]; k_ref, v_ref [N, D] (row b's pool);
    acc_ref [rows, D]; m_ref, l_ref [rows, 1]; logits_ref (optional) [rows, N].
    """
    start, length = starts_ref[...], lengths_ref[...]
    num_blocks = pl.cdiv(length, block_k)
    per_split = pl.cdiv(num_blocks, num_splits)
    first = pl.program_id(2) * per_split
    last = jnp.minimum(first + per_split, num_blocks)
    q = q_ref[...]
    rows, head_dim = q.shape
    offsets = jnp.arange(block_k)
    real_rows = (jnp.arange(rows) < group)[:, None]

    def body(block, carry):
        valid = block * block_k + offsets < length  # [block_k]; also keeps the loads inside the pool.
        slots = pl.ds(start + block * block_k, block_k)
        k = plgpu.load(k_ref.at[slots, :], mask=valid[:, None], other=0.0)
        v = plgpu.load(v_ref.at[slots, :], mask=valid[:, None], other=0.0)
        s, carry = _online_softmax_step(q, k, v, valid[None, :], valid[:, None], *carry, scale=scale)
        if logits_ref:
            plgpu.store(logits_ref[0].at[:, slots], s, mask=real_rows & valid[None, :])
        return carry

    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows, 1), NEG_INF, jnp.float32),
            jnp.zeros((rows, 1), jnp.float32))
    acc, m, l = lax.fori_loop(first, last, body, init)
    plgpu.store(acc_ref, acc)
    plgpu.store(m_ref, m)
    plgpu.store(l_ref, l)


def gpu_decode_partials(q, keys, values, starts, lengths, *, group: int, scale: float, block_k: int,
                        num_splits: int, return_logits: bool, interpret):
    """q [B, Hkv, rows, D]; keys, values [B, N, D]; starts, lengths [B, Hkv] int32.

    Returns acc [B, Hkv, S, rows, D], m, l [B, Hkv, S, rows, 1] and, with return_logits, the scores
    [B, rows, N], written only in segment slots of the first `group` rows.
    """
    batch, kv_heads, rows, head_dim = q.shape
    slots = keys.shape[1]
    scalar = pl.BlockSpec((None, None), lambda b, h, j: (b, h))
    pool = pl.BlockSpec((None, slots, head_dim), lambda b, h, j: (b, 0, 0))

    def split(*block):
        return pl.BlockSpec((None, None, None, *block), lambda b, h, j: (b, h, j, 0, 0))

    out_shape = _partial_shapes(batch, kv_heads, num_splits, rows, head_dim)
    out_specs = [split(rows, head_dim), split(rows, 1), split(rows, 1)]
    if return_logits:
        out_shape.append(jax.ShapeDtypeStruct((batch, rows, slots), jnp.float32))
        out_specs.append(pl.BlockSpec((None, rows, slots), lambda b, h, j: (b, 0, 0)))
    kernel = functools.partial(_gpu_kernel, block_k=block_k, num_splits=num_splits, group=group, scale=scale)
    return pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, num_splits),
        in_specs=[scalar, scalar, pl.BlockSpec((None, None, rows, head_dim), lambda b, h, j: (b, h, 0, 0)),
                  pool, pool],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="decode_attention_gpu",
    )(starts, lengths, q, keys, values)


# --------------------------------------------------------------------------------------- TPU


def _tpu_step(starts_ref, lengths_ref, b, h, j, i, *, kv_heads: int, block_k: int, num_splits: int,
              pool_blocks: int) -> dict:
    """What grid step (b, h, j, i) sees of segment (b, h): its slot range [start, end), its
    `num_blocks` pool blocks, the segment block `t` of the step, clamped so that a skipped step
    repeats the previous step's block (no new DMA), its pool block index, and whether to `visit`."""
    start = starts_ref[b * kv_heads + h]
    end = start + lengths_ref[b * kv_heads + h]
    first = lax.div(start, block_k)  # slots are >= 0; `//` would lower through sign().
    num_blocks = jnp.where(end > start, lax.div(end - 1, block_k) - first + 1, 0)
    per_split = lax.div(num_blocks + num_splits - 1, num_splits)
    t = jnp.maximum(jnp.minimum(j * per_split + jnp.minimum(i, per_split - 1), num_blocks - 1), 0)
    return dict(start=start, end=end, num_blocks=num_blocks, t=t, block=jnp.clip(first + t, 0, pool_blocks - 1),
                visit=(i < per_split) & (j * per_split + i < num_blocks))


def _tpu_kernel(starts_ref, lengths_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *rest,
                scale: float, group: int, return_logits: bool, **step_args):
    """Grid step (b, h, j, i): pool block `block` of segment (b, h) unless the step is skipped.

    q_ref [rows, D]; k_ref, v_ref [block_k, D]; acc_ref [rows, D]; m_ref, l_ref [rows, 1];
    optional logits_ref [G, block_k]; scratch acc_sc [rows, D], m_sc, l_sc [rows, 1].
    """
    logits_ref, acc_sc, m_sc, l_sc = rest if return_logits else (None, *rest)
    b, h, j, i = (pl.program_id(axis) for axis in range(4))
    step = _tpu_step(starts_ref, lengths_ref, b, h, j, i, **step_args)
    block_k = k_ref.shape[0]

    @pl.when(i == 0)
    def _init():
        acc_sc[...] = jnp.zeros_like(acc_sc)
        m_sc[...] = jnp.full_like(m_sc, NEG_INF)
        l_sc[...] = jnp.zeros_like(l_sc)

    @pl.when(step["visit"])
    def _compute():
        base = step["block"] * block_k

        def in_segment(slot):
            return (slot >= step["start"]) & (slot < step["end"])

        cols = in_segment(base + lax.broadcasted_iota(jnp.int32, (1, block_k), 1))
        rows = in_segment(base + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0))
        s, (acc, m, l) = _online_softmax_step(q_ref[...], k_ref[...], v_ref[...], cols, rows,
                                              acc_sc[...], m_sc[...], l_sc[...], scale=scale)
        acc_sc[...], m_sc[...], l_sc[...] = acc, m, l
        if return_logits:
            logits_ref[...] = s[:group]

    @pl.when(i == pl.num_programs(3) - 1)
    def _store():
        acc_ref[...], m_ref[...], l_ref[...] = acc_sc[...], m_sc[...], l_sc[...]


def tpu_decode_partials(q, keys, values, starts, lengths, *, group: int, scale: float, block_k: int,
                        num_splits: int, max_segment: int, return_logits: bool, interpret):
    """q [B, Hkv, rows, D]; keys, values [B, N, D]; starts, lengths [B, Hkv] int32, lengths <= max_segment.

    Grid (B, Hkv, S, blocks per split), starts and lengths prefetched to SMEM; the splits share the
    most pool blocks a segment of max_segment slots can touch, wherever it starts. Returns acc
    [B, Hkv, S, rows, D], m, l [B, Hkv, S, rows, 1] and, with return_logits, the scores
    [B, G, (P + 2 * Hkv) * block_k], P = ceil(N / block_k): the blocks inside a segment in pool
    order, then the first and last block of each KV head's segment. An edge block may straddle a
    neighbouring segment, and an output block is written back whole, so edges get blocks of their own.
    """
    batch, kv_heads, rows, head_dim = q.shape
    pool_blocks = pl.cdiv(keys.shape[1], block_k)
    segment_blocks = min(pool_blocks, pl.cdiv(max_segment - 1, block_k) + 1)
    step_args = dict(kv_heads=kv_heads, block_k=block_k, num_splits=num_splits, pool_blocks=pool_blocks)

    def kv_index(b, h, j, i, starts_ref, lengths_ref):
        return b, _tpu_step(starts_ref, lengths_ref, b, h, j, i, **step_args)["block"], 0

    def logits_index(b, h, j, i, starts_ref, lengths_ref):
        step = _tpu_step(starts_ref, lengths_ref, b, h, j, i, **step_args)
        last = (step["t"] > 0) & (step["t"] == step["num_blocks"] - 1)
        edge = pool_blocks + 2 * h + last.astype(jnp.int32)
        return b, 0, jnp.where((step["t"] == 0) | last, edge, step["block"])

    def split(*block):
        return pl.BlockSpec((None, None, None, *block), lambda b, h, j, i, *_: (b, h, j, 0, 0))

    out_shape = _partial_shapes(batch, kv_heads, num_splits, rows, head_dim)
    out_specs = [split(rows, head_dim), split(rows, 1), split(rows, 1)]
    if return_logits:
        width = (pool_blocks + 2 * kv_heads) * block_k
        out_shape.append(jax.ShapeDtypeStruct((batch, group, width), jnp.float32))
        out_specs.append(pl.BlockSpec((None, group, block_k), logits_index))
    kernel = functools.partial(_tpu_kernel, scale=scale, group=group, return_logits=return_logits, **step_args)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, kv_heads, num_splits, pl.cdiv(segment_blocks, num_splits)),
            in_specs=[pl.BlockSpec((None, None, rows, head_dim), lambda b, h, j, i, *_: (b, h, 0, 0)),
                      pl.BlockSpec((None, block_k, head_dim), kv_index),
                      pl.BlockSpec((None, block_k, head_dim), kv_index)],
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((rows, head_dim), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                            pltpu.VMEM((rows, 1), jnp.float32)],
        ),
        out_shape=out_shape,
        # Splits and blocks run in order, so that each logits block is visited in one run of steps.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        name="decode_attention_tpu",
    )(starts.reshape(-1), lengths.reshape(-1), q, keys, values)
