"""Gist masks (Mu, Li & Goodman, 2023): hand-built cases, a per-element oracle, the official code
when it imports, the block-sparse form, and the blockwise attention."""
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokcomp_jax.learned import (VARIANTS, gist_attention, gist_block_mask, gist_mask, gist_mask_block,
                                 gist_mask_from_ids, splash_gist_mask)
from jaxpr_sizes import largest_intermediate
from tolerances import attention_tolerance


def rows(*text):
    """'cgx.' per row: context, gist, later token, padding -> (is_gist, valid)."""
    chars = np.array([list(t) for t in text])
    return jnp.asarray(chars == "g"), jnp.asarray(chars != ".")


def matrix(*lines):
    return np.array([[c == "1" for c in line.split()] for line in lines])


def oracle(is_gist, valid, variant="gist"):
    """The definition, element by element: causal, padding keys masked, and a query after the last
    gist sees keys from the first gist on (gist), or after the last gist (neg_control)."""
    is_gist, valid = np.asarray(is_gist), np.asarray(valid)
    batch, seq = is_gist.shape
    out = np.zeros((batch, seq, seq), bool)
    for b in range(batch):
        gists = [i for i in range(seq) if is_gist[b, i] and valid[b, i]]
        for q in range(seq):
            for k in range(seq):
                if k > q or not valid[b, k]:
                    continue
                if not gists or variant == "pos_control" or q <= gists[-1]:
                    out[b, q, k] = True
                elif variant == "gist":
                    out[b, q, k] = k >= gists[0]
                else:
                    out[b, q, k] = k > gists[-1]
    return out


def random_rows(rng, batch, seq):
    """Gist spans (contiguous or scattered, sometimes none) with left, right or scattered padding."""
    is_gist = np.zeros((batch, seq), bool)
    valid = np.ones((batch, seq), bool)
    for b in range(batch):
        style = rng.integers(4)
        if style == 1:
            start = rng.integers(seq)
            is_gist[b, start:start + rng.integers(1, 4)] = True
        elif style >= 2:
            is_gist[b] = rng.random(seq) < 0.2
        pad = rng.integers(4)
        cut = rng.integers(seq + 1)
        if pad == 1:
            valid[b, cut:] = False
        elif pad == 2:
            valid[b, :cut] = False
        elif pad == 3:
            valid[b] = rng.random(seq) < 0.8
    return jnp.asarray(is_gist), jnp.asarray(valid)


CASES = {  # rows, then the expected [query, key] masks for gist, neg_control
    "context, gists, later": (rows("ccgg" "xxx"), matrix(
        "1 0 0 0 0 0 0",
        "1 1 0 0 0 0 0",
        "1 1 1 0 0 0 0",
        "1 1 1 1 0 0 0",
        "0 0 1 1 1 0 0",
        "0 0 1 1 1 1 0",
        "0 0 1 1 1 1 1"), matrix(
        "1 0 0 0 0 0 0",
        "1 1 0 0 0 0 0",
        "1 1 1 0 0 0 0",
        "1 1 1 1 0 0 0",
        "0 0 0 0 1 0 0",
        "0 0 0 0 1 1 0",
        "0 0 0 0 1 1 1")),
    "no gist": (rows("cccc"), matrix(
        "1 0 0 0",
        "1 1 0 0",
        "1 1 1 0",
        "1 1 1 1"), None),
    "gists at the start": (rows("ggxx"), matrix(
        "1 0 0 0",
        "1 1 0 0",
        "1 1 1 0",
        "1 1 1 1"), matrix(
        "1 0 0 0",
        "1 1 0 0",
        "0 0 1 0",
        "0 0 1 1")),
    "padding at the end": (rows("cgx.."), matrix(  # padding queries follow their position's rule
        "1 0 0 0 0",
        "1 1 0 0 0",
        "0 1 1 0 0",
        "0 1 1 0 0",
        "0 1 1 0 0"), matrix(
        "1 0 0 0 0",
        "1 1 0 0 0",
        "0 0 1 0 0",
        "0 0 1 0 0",
        "0 0 1 0 0")),
    "two different rows": (rows("cgxx", "ccgx"), np.stack([matrix(
        "1 0 0 0",
        "1 1 0 0",
        "0 1 1 0",
        "0 1 1 1"), matrix(
        "1 0 0 0",
        "1 1 0 0",
        "1 1 1 0",
        "0 0 1 1")]), np.stack([matrix(
        "1 0 0 0",
        "1 1 0 0",
        "0 0 1 0",
        "0 0 1 1"), matrix(
        "1 0 0 0",
        "1 1 0 0",
        "1 1 1 0",
        "0 0 0 1")])),
}


@pytest.mark.parametrize("name", CASES)
def test_hand_built(name):
    (is_gist, valid), expected, expected_neg = CASES[name]
    causal = np.tril(np.ones(is_gist.shape[1:] * 2, bool)) & np.asarray(valid)[:, None, :]
    np.testing.assert_array_equal(gist_mask(is_gist, valid), np.broadcast_to(expected, causal.shape))
    np.testing.assert_array_equal(gist_mask(is_gist, valid, variant="pos_control"), causal)
    neg = gist_mask(is_gist, valid, variant="neg_control")
    np.testing.assert_array_equal(neg, np.broadcast_to(expected if expected_neg is None else expected_neg,
                                                       causal.shape))


def test_from_ids():
    ids = jnp.array([[5, 6, 9, 9, 7, 8, 0], [5, 9, 7, 0, 0, 0, 0]])
    expected = gist_mask(ids == 9, ids != 0)
    np.testing.assert_array_equal(gist_mask_from_ids(ids, gist_id=9, pad_id=0), expected)
    np.testing.assert_array_equal(gist_mask_from_ids(ids, 9), gist_mask(ids == 9))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seq", [1, 2, 7, 23])
def test_matches_oracle(variant, seq):
    is_gist, valid = random_rows(np.random.default_rng(seq), 48, seq)
    got = jax.jit(functools.partial(gist_mask, variant=variant))(is_gist, valid)
    np.testing.assert_array_equal(got, oracle(is_gist, valid, variant))


def official_gist_module():
    """The official `src/data/gist.py` of jayelm/gisting, when it is importable."""
    for name in ("gisting.src.data.gist", "gisting.data.gist", "src.data.gist"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "make_gist_mask"):
            return module
    pytest.skip("the official gisting code (jayelm/gisting, src/data/gist.py) is not importable")


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_official(variant):
    official = official_gist_module()
    torch = pytest.importorskip("torch")
    is_gist, valid = random_rows(np.random.default_rng(1), 64, 19)
    gist_id, pad_id, other_id = 1, 0, 2
    ids = np.where(np.asarray(is_gist), gist_id, other_id)
    ids = torch.as_tensor(np.where(np.asarray(valid), ids, pad_id))
    make = getattr(official, f"make_{variant}_mask")
    expected = make(ids, gist_id, pad_id, dtype=torch.bool)[:, 0].numpy() & np.tril(np.ones((19, 19), bool))
    np.testing.assert_array_equal(gist_mask(is_gist, valid, variant=variant), expected)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seq, block_q, block_k", [(13, 4, 4), (37, 4, 8), (30, 8, 4), (5, 8, 8)])
def test_blocks_reassemble(variant, seq, block_q, block_k):
    is_gist, valid = random_rows(np.random.default_rng(seq + block_q), 16, seq)
    dense = np.asarray(gist_mask(is_gist, valid, variant=variant))
    kinds = np.asarray(jax.jit(functools.partial(gist_block_mask, variant=variant), static_argnums=(2, 3))(
        is_gist, valid, block_q, block_k))
    nq, nk = -(-seq // block_q), -(-seq // block_k)
    assert kinds.shape == (16, nq, nk) and kinds.dtype == np.int8
    qi, ki = (a.ravel() for a in np.meshgrid(np.arange(nq), np.arange(nk), indexing="ij"))
    tiles = jax.jit(jax.vmap(lambda i, j: gist_mask_block(is_gist, valid, i, j, block_q, block_k,
                                                          variant=variant)))(qi, ki)  # [nq * nk, B, bq, bk]
    grid = np.asarray(tiles).reshape(nq, nk, 16, block_q, block_k).transpose(2, 0, 3, 1, 4)
    grid = grid.reshape(16, nq * block_q, nk * block_k)
    np.testing.assert_array_equal(grid[:, :seq, :seq], dense)
    assert not grid[:, seq:].any() and not grid[:, :, seq:].any()
    for i in range(nq):
        for j in range(nk):
            tile = dense[:, i * block_q:(i + 1) * block_q, j * block_k:(j + 1) * block_k].reshape(16, -1)
            np.testing.assert_array_equal(kinds[:, i, j] == 0, ~tile.any(axis=1))
            np.testing.assert_array_equal(kinds[:, i, j] == 2, tile.all(axis=1))


def dense_attention(q, k, v, mask):
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])


def attention_inputs(seq=37, batch=3, heads=4, kv_heads=2, dim=16):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (batch, seq, heads, dim))
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, dim))
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, dim))
    is_gist = np.zeros((batch, seq), bool)
    valid = np.ones((batch, seq), bool)
    is_gist[0, 10:14] = True  # context, gists, later tokens
    is_gist[1, 3:5] = True
    valid[1, 30:] = False  # right padding
    is_gist[2, 20:22] = True
    valid[2, :6] = False  # left padding: the first six queries see no key
    return q, k, v, jnp.asarray(is_gist), jnp.asarray(valid)


def attention_inputs_tolerance(q, k, value_magnitude):
    """`attention_tolerance` of softmax attention of `q` over every key of `k` (GQA: query head h
    reads KV head h // group), values up to `value_magnitude`: a score's terms are |q_j k_j| / sqrt(dim)."""
    q, k = np.abs(np.asarray(q)), np.abs(np.asarray(k))
    k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
    score_magnitude = np.einsum("bqhd,bkhd->bhqk", q, k).max() / np.sqrt(q.shape[-1])
    return attention_tolerance(k.shape[1], q.shape[-1], value_magnitude, score_magnitude)


@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_matches_dense(variant):
    q, k, v, is_gist, valid = attention_inputs()
    mask = gist_mask(is_gist, valid, variant=variant)
    sees = np.asarray(mask.any(axis=-1))  # [B, T]
    got = jax.jit(functools.partial(gist_attention, block_size=8, variant=variant))(q, k, v, is_gist, valid)
    expected = dense_attention(q, k, v, mask)
    # Blockwise (online softmax over blocks of 8 keys) and dense: two orders of the same sums.
    tolerance = attention_inputs_tolerance(q, k, np.abs(np.asarray(v)).max())
    np.testing.assert_allclose(np.asarray(got)[sees], np.asarray(expected)[sees], atol=tolerance, rtol=0)
    assert not sees.all() and not np.asarray(got)[~sees].any()


def test_attention_gradients_match_dense():
    q, k, v, is_gist, valid = attention_inputs()
    weight = jnp.asarray(gist_mask(is_gist, valid).any(axis=-1), jnp.float32)[:, :, None, None]

    def loss(attend, q, k, v):
        return jnp.sum(attend(q, k, v) * weight * q)

    blockwise = functools.partial(gist_attention, is_gist=is_gist, valid=valid, block_size=8)
    dense = functools.partial(dense_attention, mask=gist_mask(is_gist, valid))
    got = jax.jit(jax.grad(functools.partial(loss, blockwise), argnums=(0, 1, 2)))(q, k, v)
    expected = jax.jit(jax.grad(functools.partial(loss, dense), argnums=(0, 1, 2)))(q, k, v)
    for g, e in zip(got, expected):
        # The backward pass sums the forward's lengths again (keys for dq, queries for dk and dv,
        # head_dim for the weights' gradients) over the forward's weights: twice its bound, relative
        # to the gradient's largest entry.
        np.testing.assert_allclose(g, e, atol=2 * attention_inputs_tolerance(q, k, np.abs(np.asarray(e)).max()), rtol=0)


def test_attention_never_builds_s_by_s():
    seq, block = 512, 64
    q = jax.ShapeDtypeStruct((1, seq, 2, 8), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, seq, 1, 8), jnp.float32)
    flags = jax.ShapeDtypeStruct((1, seq), jnp.bool_)
    attend = jax.make_jaxpr(functools.partial(gist_attention, block_size=block))(q, kv, kv, flags, flags)
    assert largest_intermediate(attend.jaxpr) < seq * seq // 8
    kinds = jax.make_jaxpr(functools.partial(gist_block_mask, block_q=block, block_k=block))(flags, flags)
    assert largest_intermediate(kinds.jaxpr) <= seq + 1
    dense = jax.make_jaxpr(gist_mask)(flags, flags)  # the check sees an S x S array where there is one
    assert largest_intermediate(dense.jaxpr) >= seq * seq


def test_splash_mask_matches_one_row():
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    for first, last in [(5, 7), (0, 1), (None, None)]:
        is_gist = np.zeros((1, 16), bool)
        if first is not None:
            is_gist[0, first:last + 1] = True
        for variant in VARIANTS:
            mask = splash_gist_mask(16, first, last, variant=variant)
            np.testing.assert_array_equal(mask[:, :], gist_mask(jnp.asarray(is_gist), variant=variant)[0])
            assert mask == splash_gist_mask(16, first, last, variant=variant) and hash(mask)
    with pytest.raises(ValueError, match="first_gist and last_gist"):
        splash_gist_mask(16, 7, 5)


def test_bad_input():
    is_gist, valid = rows("cgxx")
    with pytest.raises(ValueError, match="is_gist must be a boolean"):
        gist_mask(is_gist.astype(jnp.int32))
    with pytest.raises(ValueError, match="is_gist must be a boolean"):
        gist_mask(is_gist[0])
    with pytest.raises(ValueError, match="valid must be a boolean array shaped like is_gist"):
        gist_mask(is_gist, valid[:, :3])
    with pytest.raises(ValueError, match="valid must be a boolean"):
        gist_block_mask(is_gist, valid.astype(jnp.float32), 2, 2)
    with pytest.raises(ValueError, match="variant must be one of"):
        gist_mask(is_gist, variant="positive")
    with pytest.raises(ValueError, match="ids must be an integer"):
        gist_mask_from_ids(jnp.zeros((4,), jnp.int32), 1)
    with pytest.raises(ValueError, match="block_q must be a positive int"):
        gist_block_mask(is_gist, valid, 0, 2)
    with pytest.raises(ValueError, match="block_k must be a positive int"):
        gist_mask_block(is_gist, valid, 0, 0, 2, -1)
    q, k, v, is_gist, valid = attention_inputs()
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        gist_attention(q, k, v, is_gist, valid, block_size=0)
    with pytest.raises(ValueError, match="H a multiple of Hkv"):
        gist_attention(q[:, :, :3], k, v, is_gist, valid)
    with pytest.raises(ValueError, match="is_gist must be"):
        gist_attention(q, k, v, is_gist[:, :4], valid[:, :4])
