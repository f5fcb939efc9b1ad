"""Gist-token attention masks (Mu, Li & Goodman, 2023, "Learning to Compress Prompts with Gist
Tokens", arXiv:2304.08467): dense, block-sparse, and a blockwise attention that never builds S x S.

In a row [context, gist tokens, later tokens], tokens after the last gist cannot attend to anything
before the first gist; all else is causal attention. As in the official code (`gisting`,
`src/data/gist.py`), only a row's first and last gist matter, padding keys are masked, and a row
without gists gets the plain causal mask. Variants, named after the official functions:

- "gist" (`make_gist_mask`): later tokens see the gists and what follows them;
- "neg_control" (`make_neg_control_mask`): later tokens see neither the context nor the gists;
- "pos_control" (`make_pos_control_mask`): plain causal attention, gists present but unmasked.

Padding queries follow the rule of a real token at their position (the official masks only mask
padding keys), so a padding query's row may be empty, e.g. under left padding. A padding position
is never a gist.

Each variant is `valid[k] & (k <= q) & ((q <= last) | (k >= start))` with two numbers per row:
`last` (the last gist; S - 1 when the row has none, or for pos_control) and `start` (the first gist;
last + 1 for neg_control), so the mask of any tile, and which tiles are empty, follow from them.
"""
from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, Int8

Variant = Literal["gist", "neg_control", "pos_control"]
VARIANTS = ("gist", "neg_control", "pos_control")
MASKED, PARTIAL, VISIBLE = 0, 1, 2


class _Bounds(NamedTuple):
    last: Int[Array, "B"]  # queries at or before `last` attend causally
    start: Int[Array, "B"]  # queries after `last` see keys from `start` on
    valid: Bool[Array, "B S"]


def _check_positive(name: str, size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"{name} must be a positive int, got {size!r}.")
    return int(size)


def _bounds(is_gist, valid, variant: str) -> _Bounds:
    """Validates the flags and reduces each row to its (last, start) pair."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    is_gist = jnp.asarray(is_gist)
    if is_gist.dtype != jnp.bool_ or is_gist.ndim != 2:
        raise ValueError(f"is_gist must be a boolean [B, S] array, got dtype {is_gist.dtype} and shape "
                         f"{is_gist.shape}; pass `ids == gist_id` or use gist_mask_from_ids.")
    if valid is None:
        valid = jnp.ones_like(is_gist)
    valid = jnp.asarray(valid)
    if valid.dtype != jnp.bool_ or valid.shape != is_gist.shape:
        raise ValueError(f"valid must be a boolean array shaped like is_gist {is_gist.shape} (True for real "
                         f"tokens), got dtype {valid.dtype} and shape {valid.shape}.")
    seq = is_gist.shape[1]
    gist = is_gist & valid
    first = jnp.argmax(gist, axis=1)
    last = seq - 1 - jnp.argmax(gist[:, ::-1], axis=1)
    has_gist = gist.any(axis=1) & (variant != "pos_control")
    start = first if variant == "gist" else last + 1
    return _Bounds(jnp.where(has_gist, last, seq - 1).astype(jnp.int32),
                   jnp.where(has_gist, start, 0).astype(jnp.int32), valid)


def _tile(bounds: _Bounds, q_start, k_start, block_q: int, block_k: int) -> Bool[Array, "B bq bk"]:
    """The mask of queries q_start + [0, block_q) over keys k_start + [0, block_k); False beyond S."""
    seq = bounds.valid.shape[1]
    q = q_start + jnp.arange(block_q)
    k = k_start + jnp.arange(block_k)
    valid_k = jnp.take(bounds.valid, k, axis=1, mode="fill", fill_value=False)
    rule = (q[None, :, None] <= bounds.last[:, None, None]) | (k[None, None, :] >= bounds.start[:, None, None])
    return valid_k[:, None, :] & ((k[None, :] <= q[:, None]) & (q < seq)[:, None])[None] & rule


def _kinds(bounds: _Bounds, block_q: int, block_k: int) -> Int8[Array, "B nq nk"]:
    """Classifies every tile from the row bounds and prefix counts of valid keys."""
    batch, seq = bounds.valid.shape
    q0 = jnp.arange(-(-seq // block_q))[:, None] * block_q
    k0 = jnp.arange(-(-seq // block_k))[None, :] * block_k
    q1, k1 = jnp.minimum(q0 + block_q, seq) - 1, jnp.minimum(k0 + block_k, seq) - 1
    prefix = jnp.pad(jnp.cumsum(bounds.valid, axis=1, dtype=jnp.int32), ((0, 0), (1, 0)))  # [B, S + 1]
    rows = jnp.arange(batch)[:, None, None]

    def n_valid(lo, hi):  # valid keys in [lo, hi] per row
        count = prefix[rows, jnp.clip(hi + 1, 0, seq)] - prefix[rows, jnp.clip(lo, 0, seq)]
        return jnp.where(lo <= hi, count, 0)

    last, start = bounds.last[:, None, None], bounds.start[:, None, None]
    early = (q0 <= last) & (n_valid(k0, jnp.minimum(k1, jnp.minimum(q1, last))) > 0)
    late = (q1 > last) & (n_valid(jnp.maximum(k0, start), jnp.minimum(k1, q1)) > 0)
    full = (n_valid(k0, k1) == k1 - k0 + 1) & (k1 <= q0) & ((q1 <= last) | (k0 >= start))
    return jnp.where(full, VISIBLE, jnp.where(early | late, PARTIAL, MASKED)).astype(jnp.int8)


def gist_mask(is_gist: Bool[Array, "B S"], valid: Bool[Array, "B S"] | None = None, *,
              variant: Variant = "gist") -> Bool[Array, "B S S"]:
    """The causal gist mask `[B, query, key]` (official `make_gist_mask` ANDed with causality).

    >>> import jax.numpy as jnp
    >>> is_gist = jnp.array([[False, True, False]])
    >>> gist_mask(is_gist)[0].astype(int).tolist()
    [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """
    bounds = _bounds(is_gist, valid, variant)
    seq = bounds.valid.shape[1]
    return _tile(bounds, 0, 0, seq, seq)


def gist_mask_from_ids(ids: Int[Array, "B S"], gist_id: int, pad_id: int | None = None, *,
                       variant: Variant = "gist") -> Bool[Array, "B S S"]:
    """`gist_mask` from token ids: gists are `ids == gist_id`, padding is `ids == pad_id`.

    >>> import jax.numpy as jnp
    >>> gist_mask_from_ids(jnp.array([[5, 9, 6, 0]]), gist_id=9, pad_id=0).shape
    (1, 4, 4)
    """
    ids = jnp.asarray(ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"ids must be an integer [B, S] array, got dtype {ids.dtype} and shape {ids.shape}.")
    return gist_mask(ids == gist_id, None if pad_id is None else ids != pad_id, variant=variant)


def gist_block_mask(is_gist: Bool[Array, "B S"], valid: Bool[Array, "B S"] | None, block_q: int,
                    block_k: int, *, variant: Variant = "gist") -> Int8[Array, "B nq nk"]:
    """Kind of each (query block, key block) tile of `gist_mask`: 0 all masked, 1 partial, 2 all
    visible, in O(S + nq * nk) without building the mask. Tiles at the end of a sequence that is not
    a multiple of the block are classified on their in-range part.

    >>> import jax.numpy as jnp
    >>> gist_block_mask(jnp.arange(8)[None] == 4, None, 4, 4)[0].tolist()
    [[1, 0], [1, 1]]
    """
    block_q, block_k = _check_positive("block_q", block_q), _check_positive("block_k", block_k)
    return _kinds(_bounds(is_gist, valid, variant), block_q, block_k)


def gist_mask_block(is_gist: Bool[Array, "B S"], valid: Bool[Array, "B S"] | None, q_block: int | Int[Array, ""],
                    k_block: int | Int[Array, ""], block_q: int, block_k: int, *,
                    variant: Variant = "gist") -> Bool[Array, "B block_q block_k"]:
    """The tile of `gist_mask` for query block `q_block` and key block `k_block` (indices, may be
    traced), built from positions; entries beyond S are False.

    >>> import jax.numpy as jnp
    >>> gist_mask_block(jnp.arange(8)[None] == 4, None, 1, 0, 4, 4)[0].astype(int).tolist()
    [[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    """
    block_q, block_k = _check_positive("block_q", block_q), _check_positive("block_k", block_k)
    bounds = _bounds(is_gist, valid, variant)
    return _tile(bounds, q_block * block_q, k_block * block_k, block_q, block_k)


def gist_attention(q: Float[Array, "B T H D"], k: Float[Array, "B T Hkv D"], v: Float[Array, "B T Hkv D"],
                   is_gist: Bool[Array, "B T"], valid: Bool[Array, "B T"] | None = None, block_size: int = 128, *,
                   variant: Variant = "gist", scale: float | None = None) -> Float[Array, "B T H D"]:
    """Softmax attention under `gist_mask`, blockwise in pure XLA: a map over query blocks, an online
    softmax over key blocks, fully masked tiles skipped, so memory is O(T * block_size). GQA query
    heads share KV heads in order (H a multiple of Hkv); `scale` defaults to 1 / sqrt(D). A query
    that sees no key (a padding query under left padding) gets zeros.

    >>> import jax.numpy as jnp
    >>> x = jnp.ones((1, 5, 2, 4))
    >>> gist_attention(x, x[:, :, :1], x[:, :, :1], jnp.arange(5)[None] == 2, block_size=2).shape
    (1, 5, 2, 4)
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] \
            or q.shape[2] % k.shape[2]:
        raise ValueError(f"q must be [B, T, H, D] and k, v [B, T, Hkv, D] with H a multiple of Hkv, got q "
                         f"{q.shape}, k {k.shape}, v {v.shape}.")
    block = _check_positive("block_size", block_size)
    bounds = _bounds(is_gist, valid, variant)
    batch, steps, heads, dim = q.shape
    kv_heads = k.shape[2]
    if bounds.valid.shape != (batch, steps):
        raise ValueError(f"is_gist must be [B, T] = {(batch, steps)} like q, got {bounds.valid.shape}.")
    scale = dim ** -0.5 if scale is None else scale
    kinds = _kinds(bounds, block, block)  # [B, n, n]
    n = kinds.shape[1]
    pad = ((0, 0), (0, n * block - steps), (0, 0), (0, 0))
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    q_blocks = jnp.pad(q, pad).reshape(batch, n, block, kv_heads, heads // kv_heads, dim).swapaxes(0, 1)

    def query_block(args):
        i, qi = args  # qi [B, bq, Hkv, G, D]

        def update(j, carry):
            m, l, acc = carry  # [B, Hkv, G, bq], same, [B, Hkv, G, bq, D]
            kj = jax.lax.dynamic_slice_in_dim(k, j * block, block, axis=1)
            vj = jax.lax.dynamic_slice_in_dim(v, j * block, block, axis=1)
            s = jnp.einsum("bqhgd,bkhd->bhgqk", qi, kj, preferred_element_type=jnp.float32) * scale
            s = jnp.where(_tile(bounds, i * block, j * block, block, block)[:, None, None], s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - shift[..., None])
            correction = jnp.exp(m - shift)
            acc = acc * correction[..., None] + jnp.einsum("bhgqk,bkhd->bhgqd", p, vj.astype(jnp.float32))
            return m_new, l * correction + p.sum(axis=-1), acc

        def body(j, carry):
            return jax.lax.cond(jnp.any(kinds[:, i, j] != MASKED), functools.partial(update, j), lambda c: c, carry)

        shape = (batch, kv_heads, heads // kv_heads, block)
        init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros((*shape, dim), jnp.float32))
        _, l, acc = jax.lax.fori_loop(0, n, body, init)
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]
        return out.transpose(0, 3, 1, 2, 4)  # [B, bq, Hkv, G, D]

    out = jax.lax.map(query_block, (jnp.arange(n), q_blocks))  # [n, B, bq, Hkv, G, D]
    return out.swapaxes(0, 1).reshape(batch, n * block, heads, dim)[:, :steps].astype(q.dtype)


@functools.cache
def _splash_gist_mask_class():
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash

    class SplashGistMask(splash._ComputableMask):
        """One row's gist mask, computed inside the splash kernel from (last, start)."""

        def __init__(self, seq_len: int, last: int, start: int):
            self.last, self.start = last, start
            super().__init__((seq_len, seq_len), lambda q, k: (k <= q) & ((q <= last) | (k >= start)))

        def __eq__(self, other):
            return isinstance(other, SplashGistMask) and (self.shape, self.last, self.start) == (
                other.shape, other.last, other.start)

        def __hash__(self):
            return hash((SplashGistMask, self.shape, self.last, self.start))

    return SplashGistMask


def splash_gist_mask(seq_len: int, first_gist: int | None, last_gist: int | None, *, variant: Variant = "gist"):
    """A splash-attention (TPU) `Mask` of one row's gist pattern, for gists at static positions
    `first_gist..last_gist` (None: no gist); padding goes through splash's segment ids.

    >>> splash_gist_mask(4, 1, 1)[:, :].astype(int).tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]]
    """
    seq_len = _check_positive("seq_len", seq_len)
    is_gist = np.zeros((1, seq_len), bool)
    if first_gist is not None or last_gist is not None:
        if first_gist is None or last_gist is None or not 0 <= first_gist <= last_gist < seq_len:
            raise ValueError(f"first_gist and last_gist must both be None or satisfy 0 <= first_gist <= last_gist < "
                             f"seq_len = {seq_len}, got {first_gist} and {last_gist}.")
        is_gist[0, [first_gist, last_gist]] = True  # only the first and last gist matter
    bounds = _bounds(is_gist, None, variant)
    return _splash_gist_mask_class()(seq_len, int(bounds.last[0]), int(bounds.start[0]))
