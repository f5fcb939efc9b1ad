"""The XLA backend's blockwise attention against the dense reference (`tc.attention.attend`): equal
up to float32 summation order for every mask the model asks for, and costing what the queries see."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tokcomp_jax as tc
from jaxpr_sizes import largest_intermediate
from tokcomp_jax.blockwise_attention import DEFAULT_BLOCK_SIZE, blockwise_attend, visible_slots
from tolerances import attention_tolerance, score_magnitude


def _layer(rng, lengths, capacity, kv_heads=2, dim=8, gaps=False):
    """A cache whose (row, head) b, h holds lengths[b][h] entries; `gaps`: positions skip some
    tokens, as after compression."""
    batch = len(lengths)
    keys = rng.standard_normal((batch, kv_heads, capacity, dim)).astype(np.float32)
    values = rng.standard_normal((batch, kv_heads, capacity, dim)).astype(np.float32)
    positions = np.full((batch, kv_heads, capacity), -1, np.int32)
    for b in range(batch):
        for h in range(kv_heads):
            n = lengths[b][h]
            positions[b, h, :n] = np.sort(rng.choice(np.arange(2 * n), n, replace=False)) if gaps else np.arange(n)
    filled = np.arange(capacity) < np.asarray(lengths)[..., None]
    keys, values = np.where(filled[..., None], keys, 0), np.where(filled[..., None], values, 0)
    return tc.LayerCache(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(positions),
                         jnp.asarray(lengths, jnp.int32))


def _check(queries, layer, query_positions, **kwargs):
    got = blockwise_attend(queries, layer, query_positions, **kwargs)
    want = tc.attention.attend(queries, layer, query_positions,
                               **{k: v for k, v in kwargs.items() if k != "block_size"})
    keys = layer.capacity
    dim = queries.shape[-1]
    batch, steps, heads, _ = queries.shape
    pool = np.asarray(layer.keys).reshape(batch, -1, dim)
    tolerance = attention_tolerance(keys, dim, np.abs(np.asarray(layer.values)).max(),
                                    score_magnitude(queries, pool, dim ** -0.5))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=tolerance)
    return got


@pytest.mark.parametrize("steps, capacity, block", [(1, 40, 8), (7, 40, 8), (16, 16, 4), (13, 50, 16), (5, 9, 64)])
def test_equals_the_dense_reference_on_ragged_rows(steps, capacity, block):
    """Rows and heads of different lengths, queries at the latest positions (a chunk just appended),
    a chunk not a multiple of the block, a capacity not a multiple of it, one query block or many."""
    rng = np.random.default_rng(steps * capacity)
    lengths = [[capacity - 3, capacity - 5], [steps, min(steps + 2, capacity)]]
    layer = _layer(rng, lengths, capacity)
    queries = jnp.asarray(rng.standard_normal((2, steps, 4, 8)), jnp.float32)
    query_positions = jnp.asarray([np.arange(steps) + capacity - 3 - steps, np.arange(steps)], jnp.int32)
    _check(queries, layer, query_positions, block_size=block)


def test_compressed_cache_with_sliding_window_and_extra_mask():
    rng = np.random.default_rng(0)
    layer = _layer(rng, [[20, 13], [7, 30]], 32, gaps=True)
    queries = jnp.asarray(rng.standard_normal((2, 6, 4, 8)), jnp.float32)
    query_positions = jnp.asarray([[30, 31, 33, 34, 35, 36], [-1, 40, 41, 50, 58, 60]], jnp.int32)
    extra_mask = jnp.asarray(rng.random((2, 6, 32)) < 0.7)
    out = _check(queries, layer, query_positions, block_size=8, sliding_window=9, extra_mask=extra_mask)
    assert np.all(np.asarray(out[1, 0]) == 0)  # a query that sees nothing gets zeros


def test_slots_no_query_can_see_are_never_read():
    """NaN values in the blocks past the last visible slot leave the output finite: those blocks are
    skipped, not masked (a masked slot still multiplies its value by a zero probability)."""
    rng = np.random.default_rng(1)
    layer = _layer(rng, [[20, 20]], 64)
    poisoned = layer.values.at[:, :, 24:].set(jnp.nan)
    layer = tc.LayerCache(layer.keys, poisoned, layer.positions, layer.lengths)
    queries = jnp.asarray(rng.standard_normal((1, 4, 4, 8)), jnp.float32)
    out = blockwise_attend(queries, layer, jnp.arange(16, 20)[None], block_size=8)
    assert np.isfinite(np.asarray(out)).all()
    assert int(visible_slots(layer, jnp.asarray([17]))) == 18
    # An earlier query block stops earlier: queries at positions 0..3 read one block of 8 slots.
    layer = tc.LayerCache(layer.keys, layer.values.at[:, :, 8:].set(jnp.nan), layer.positions, layer.lengths)
    early = blockwise_attend(queries, layer, jnp.arange(4)[None], block_size=8)
    assert np.isfinite(np.asarray(early)).all()


def test_materialises_no_score_matrix_beyond_one_block():
    """A 512-token chunk over a 4,096-slot cache: no value as large as [T, C] scores of one head."""
    layer = tc.LayerCache.empty(1, 3, 4096, 64)
    queries = jnp.zeros((1, 512, 9, 64), jnp.float32)
    traced = jax.make_jaxpr(lambda q, l: blockwise_attend(q, l, jnp.arange(512)[None], block_size=256))(queries, layer)
    assert largest_intermediate(traced.jaxpr) <= 4096 * 3 * 64  # the cache itself; scores are 3 * 768 * 256


def test_the_backend_differentiates_like_the_dense_reference_and_saves_only_its_inputs():
    """The XLA backend's gradients with respect to queries, keys and values are `attend`'s (its
    backward pass), and what its forward keeps for them is its inputs, no block of scores. (More
    queries than `DENSE_QUERIES` over a cache of more than one block: the blockwise path.)"""
    rng = np.random.default_rng(2)
    capacity, steps = 300, 20
    assert capacity > DEFAULT_BLOCK_SIZE and steps > tc.attention.DENSE_QUERIES
    layer = _layer(rng, [[200, 130], [70, 300]], capacity, gaps=True)
    queries = jnp.asarray(rng.standard_normal((2, steps, 4, 8)), jnp.float32)
    query_positions = jnp.asarray(np.sort(rng.choice(np.arange(600), (2, steps)), axis=1), jnp.int32)
    extra_mask = jnp.asarray(rng.random((2, steps, capacity)) < 0.7)
    cotangent = jnp.asarray(rng.standard_normal(queries.shape), jnp.float32)

    def loss(attention, q, k, v):
        out = attention(q, tc.LayerCache(k, v, layer.positions, layer.lengths), query_positions, sliding_window=9,
                        extra_mask=extra_mask)
        return jnp.sum((out[0] if isinstance(out, tuple) else out) * cotangent)

    arguments = (queries, layer.keys, layer.values)
    got = jax.grad(lambda *a: loss(tc.attention.xla_attention, *a), argnums=(0, 1, 2))(*arguments)
    want = jax.grad(lambda *a: loss(tc.attention.attend, *a), argnums=(0, 1, 2))(*arguments)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))  # the same backward computation
    _, residuals = jax.linearize(lambda q: loss(tc.attention.xla_attention, q, layer.keys, layer.values), queries)
    saved = jax.tree.leaves(residuals)
    assert max(x.size for x in saved) <= extra_mask.size  # inputs only; the dense probs are 2*4*20*300
