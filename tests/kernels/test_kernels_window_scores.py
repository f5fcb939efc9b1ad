"""Window scoring (prefill lse + key mass + pooling within each KV head's segment) equals the dense
reference, on both backends in interpret mode."""
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.window_scores import pool_keys, window_scores
from pallas_kernels.window_scores.reference import window_scores_reference
from tolerances import attention_mass_tolerance, roundoff, score_magnitude


def _ragged_pool(rng, batch=2, kv_heads=3, heads=9, dim=64, window=7, dtype=jnp.float32):
    """A pool with unequal segments (a compressed cache plus the window appended), NaN in free slots."""
    segment = 40
    slots = kv_heads * segment
    keys = rng.normal(size=(batch, slots, dim)).astype(np.float32)
    keys[:, segment - 3:segment] = np.nan  # free slots at the end of head 0's segment
    values = rng.normal(size=(batch, slots, dim)).astype(np.float32)
    starts = np.tile(np.arange(kv_heads, dtype=np.int32) * segment, (batch, 1))
    lengths = np.array([[segment - 3, 1, 29], [0, segment, 17]], np.int32)[:batch, :kv_heads]
    positions = np.full((batch, slots), 10 ** 6, np.int32)
    last = 60
    for b in range(batch):
        for h in range(kv_heads):
            n = lengths[b, h]
            kept = np.sort(rng.choice(last - window, size=max(n - window, 0), replace=False))
            positions[b, starts[b, h]:starts[b, h] + n] = np.concatenate([kept, np.arange(last - window, last)])[-n:] \
                if n else []
    q = rng.normal(size=(batch, window, heads, dim)).astype(np.float32)
    query_positions = np.tile(np.arange(last - window, last, dtype=np.int32), (batch, 1))
    weights = rng.uniform(size=(batch, window)).astype(np.float32)
    weights[0, 0] = 0.0
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return (cast(q), cast(keys), cast(values), jnp.asarray(starts), jnp.asarray(lengths), jnp.asarray(positions),
            jnp.asarray(query_positions), jnp.asarray(weights))


def assert_matches(args, got, expected, pool_size=1):
    """`attention_mass_tolerance` over the longest segment: a pooled score sums the W·G weighted
    probabilities of `pool_size` slots (then divides by `pool_size`), the kernel's lse and the
    reference's softmax normalise them in other orders. bfloat16 inputs give the same bound: their
    products are exact in the float32 sums of both sides."""
    q, keys, lengths = args[0], args[1], args[4]
    window, heads, head_dim = q.shape[1:]
    terms = window * (heads // lengths.shape[1]) * pool_size
    scores = score_magnitude(q, keys, head_dim ** -0.5)
    tolerance = attention_mass_tolerance(int(lengths.max()), head_dim, terms, np.abs(np.asarray(expected)).max(),
                                         scores)
    np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("pool_size", [1, 5])
def test_window_scores_equal_the_dense_reference(backend, pool_size):
    args = _ragged_pool(np.random.default_rng(pool_size))
    got = window_scores(*args, pool_size=pool_size, backend=backend, interpret=True)
    expected = window_scores_reference(*args, pool_size=pool_size)
    assert_matches(args, got, expected, pool_size)
    starts, lengths = np.asarray(args[3]), np.asarray(args[4])
    inside = np.zeros(got.shape, bool)
    for b, h in np.ndindex(starts.shape):
        inside[b, starts[b, h]:starts[b, h] + lengths[b, h]] = True
    assert np.all(np.asarray(got)[~inside] == 0) and np.isfinite(np.asarray(got)).all()


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_max_segment_goes_to_both_kernels(backend):
    """Segments of at most 40 slots: the pool's 40 per head, row 1's longest segment."""
    args = _ragged_pool(np.random.default_rng(2))
    got = window_scores(*args, max_segment=40, backend=backend, interpret=True)
    assert_matches(args, got, window_scores_reference(*args))


def test_window_scores_bfloat16_and_a_given_lse():
    args = _ragged_pool(np.random.default_rng(7), dtype=jnp.bfloat16)
    expected = window_scores_reference(*args, pool_size=3)
    assert_matches(args, window_scores(*args, pool_size=3), expected, pool_size=3)
    from pallas_kernels.prefill_attention import prefill_attention
    _, lse = prefill_attention(*args[:7])
    assert_matches(args, window_scores(*args, lse=lse, pool_size=3), expected, pool_size=3)


def test_pooling_stays_inside_each_heads_segment():
    per_slot = jnp.arange(1.0, 13.0)[None]  # two heads: slots 0..5 (4 kept) and 6..11 (5 kept)
    pooled = pool_keys(per_slot, jnp.array([[0, 6]]), jnp.array([[4, 5]]), 3)
    expected = np.array([1 + 2, 1 + 2 + 3, 2 + 3 + 4, 3 + 4, 0, 0, 7 + 8, 7 + 8 + 9, 8 + 9 + 10, 9 + 10 + 11,
                         10 + 11, 0]) / 3
    # Exact float32 sums of small integers divided by 3, which XLA may do as a product with 1/3 (two
    # float32 roundings), against float64 (one): 2·u32 + u64 relative.
    np.testing.assert_allclose(pooled[0], expected, rtol=2 * roundoff(np.float32) + roundoff(np.float64), atol=0)


def test_bad_arguments_raise():
    args = _ragged_pool(np.random.default_rng(0))
    with pytest.raises(ValueError, match="pool_size must be an odd number"):
        window_scores(*args, pool_size=4)
    with pytest.raises(ValueError, match="lse must be"):
        window_scores(*args, lse=jnp.zeros((2, 9, 3)))
    with pytest.raises(ValueError, match="max_segment must be an int in"):
        window_scores(*args, max_segment=121)
