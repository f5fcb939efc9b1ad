"""Decode attention over a compressed KV cache: split-K (FlashDecoding) Pallas kernels.

One query token per row; the query heads of a KV head (GQA) share its segment of the pool; the
segments are ragged per (row, KV head). Optionally returns each slot's attention probability
summed over its KV head's query heads, the score H2O, TOVA and A2SF accumulate while decoding.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import (check_block_size, check_dtypes, check_pool, resolve_backend, resolve_max_segment,
                                   segment_mask)
from pallas_kernels.decode_attention.kernel import gpu_decode_partials, tpu_decode_partials
from pallas_kernels.decode_attention.reference import decode_attention_reference

__all__ = ["decode_attention", "decode_attention_reference"]

# Smallest block: Triton's dot needs >= 16 on every side; a TPU block spans whole 128-lane tiles.
MIN_BLOCK_K = {"gpu": 16, "tpu": 128}
MAX_SPLITS = 64
TARGET_PROGRAMS = 512


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def default_block_k(backend: str, max_segment: int, head_dim: int, itemsize: int) -> int:
    """GPU: up to 128 slots, 32 KiB of keys per block (K and V of two pipeline stages stay in
    shared memory); TPU: 512 slots. Never past the next power of two of a segment's most slots."""
    block = min(128, 32768 // (head_dim * itemsize)) if backend == "gpu" else 512
    return max(MIN_BLOCK_K[backend], min(block, _next_pow2(max_segment)))


def default_num_splits(backend: str, segment_blocks: int, programs: int) -> int:
    """GPU: enough splits for about `TARGET_PROGRAMS` programs over the `programs` (row, KV head)
    pairs (a few waves of an H100's 132 SMs), at least two blocks per split and at most
    `MAX_SPLITS`. TPU: one, as its grid runs the splits of a segment one after another."""
    if backend == "tpu":
        return 1
    return max(1, min(MAX_SPLITS, segment_blocks // 2, -(-TARGET_PROGRAMS // programs)))


def decode_attention(q, keys, values, starts, lengths, *, return_probs=False, scale=None, max_segment=None,
                     block_k=None, num_splits=None, backend=None, interpret=None):
    """q [B, H, D]; keys, values [B, N, D]; starts, lengths [B, Hkv] int32.

    Returns out [B, H, D] in q's dtype (softmax(q.k * scale) @ v over the head's segment; zeros for a
    head whose length is 0), or (out, probs) with probs [B, N] float32: for each slot of a segment,
    its attention probability summed over the G query heads of its KV head; 0 in slots of no segment.
    scale defaults to D ** -0.5. Scores/softmax accumulate in float32.

    Query head j attends with KV head j // G, G = H // Hkv. Segments must lie inside the pool and
    not overlap; slots in no segment may hold anything. max_segment (static, an int in [1, N]; None
    means N) is the most slots any segment holds: lengths must not exceed it (the entries of a
    segment past its first max_segment slots are ignored), and it bounds the TPU grid and the
    defaults. block_k (slots per block, a power of two, >= 16 on GPU, >= 128 on TPU) and num_splits
    (programs per segment, capped at the blocks of max_segment slots) default from max_segment, D
    and the dtype (`default_block_k`, `default_num_splits`). backend "gpu" (Pallas Triton) or "tpu"
    (Mosaic), None for the device's; interpret None runs the kernel in interpret mode off GPU and TPU.
    """
    backend, interpret = resolve_backend(backend, interpret)
    batch, slots, kv_heads, head_dim = check_pool(keys, values, starts, lengths)
    if q.ndim != 3 or q.shape[0] != batch or q.shape[2] != head_dim:
        raise ValueError(f"q must be one query token per row, shaped [B, H, D] = [{batch}, H, {head_dim}] "
                         f"like keys; got shape {tuple(q.shape)}.")
    if q.shape[1] % kv_heads:
        raise ValueError(f"q's {q.shape[1]} heads must be a multiple of the {kv_heads} KV heads of starts "
                         f"and lengths (query head j attends with KV head j // (H // Hkv)).")
    dtype = check_dtypes(q=q, keys=keys, values=values)
    max_segment = resolve_max_segment(max_segment, slots)
    if block_k is None:
        block_k = default_block_k(backend, max_segment, head_dim, dtype.itemsize)
    check_block_size("block_k", block_k, MIN_BLOCK_K[backend])
    segment_blocks = -(-max_segment // block_k)
    if num_splits is None:
        num_splits = default_num_splits(backend, segment_blocks, batch * kv_heads)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be an int >= 1 (or None for the default), got {num_splits!r}.")
    scale = head_dim ** -0.5 if scale is None else float(scale)
    return _decode_attention(q, keys, values, starts.astype(jnp.int32), lengths.astype(jnp.int32),
                             return_probs=bool(return_probs), scale=scale, max_segment=int(max_segment),
                             block_k=int(block_k), num_splits=min(num_splits, segment_blocks), backend=backend,
                             interpret=interpret)


@functools.partial(jax.jit, static_argnames=("return_probs", "scale", "max_segment", "block_k", "num_splits",
                                             "backend", "interpret"))
def _decode_attention(q, keys, values, starts, lengths, *, return_probs, scale, max_segment, block_k, num_splits,
                      backend, interpret):
    batch, heads, head_dim = q.shape
    slots = keys.shape[1]
    kv_heads = starts.shape[1]
    group = heads // kv_heads
    rows = max(16, _next_pow2(group))
    lengths = jnp.minimum(lengths, max_segment)
    qg = jnp.pad(q.reshape(batch, kv_heads, group, head_dim), ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    kernel = (gpu_decode_partials if backend == "gpu"
              else functools.partial(tpu_decode_partials, max_segment=max_segment))
    partials = kernel(qg, keys, values, starts, lengths, group=group, scale=scale, block_k=block_k,
                      num_splits=num_splits, return_logits=return_probs, interpret=interpret)

    # Exact log-sum-exp combine of the splits (axis 2); m, l [B, Hkv, S, rows, 1].
    acc, m, l = partials[:3]
    peak = m.max(axis=2)
    weight = jnp.exp(m - peak[:, :, None])
    total = (l * weight).sum(axis=2)  # [B, Hkv, rows, 1]
    acc = (acc * weight).sum(axis=2)
    out = jnp.where(total > 0, acc / jnp.where(total > 0, total, 1.0), 0.0)
    out = out[:, :, :group].reshape(batch, heads, head_dim).astype(q.dtype)
    if not return_probs:
        return out

    lse = (peak + jnp.log(total))[:, :, :group]  # [B, Hkv, G, 1]
    if backend == "gpu":
        logits = partials[3][:, None, :group]  # [B, 1, G, N]
    else:
        logits = _tpu_logits(partials[3], starts, lengths, slots=slots, block_k=block_k)
    inside = segment_mask(starts, lengths, slots)  # [B, Hkv, N]; never read a slot outside it.
    probs = jnp.where(inside, jnp.exp(logits - lse).sum(axis=2), 0.0).sum(axis=1)
    return out, probs


def _tpu_logits(logits, starts, lengths, *, slots: int, block_k: int):
    """Scores [B, Hkv, G, N] from the TPU kernel's [B, G, (P + 2 * Hkv) * block_k], right in each
    head's own segment slots: interior blocks in pool order, then each head's first and last block."""
    batch, group, _ = logits.shape
    kv_heads = starts.shape[1]
    pool_blocks = -(-slots // block_k)
    edges = logits[..., pool_blocks * block_k:].reshape(batch, group, kv_heads, 2, block_k)
    edges = jnp.tile(edges.transpose(0, 2, 3, 1, 4), pool_blocks)[..., :slots]  # slot n -> column n % block_k
    block = jnp.arange(slots, dtype=jnp.int32) // block_k
    first = (starts // block_k)[:, :, None, None]
    last = ((starts + lengths - 1) // block_k)[:, :, None, None]
    interior = logits[:, None, :, :slots]
    return jnp.where(block == first, edges[:, :, 0], jnp.where(block == last, edges[:, :, 1], interior))
