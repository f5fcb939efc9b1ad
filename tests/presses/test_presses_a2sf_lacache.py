"""A2SF and LaCache. A2SF: a NumPy oracle over the full attention matrix, forgetting_factor=1 as H2O's
accumulated attention, a selection that depends neither on the chunk size nor on the other rows.
LaCache: hand-checked ladders, the official code's pattern, exact budgets and ragged batches.
Every prefill runs jitted (`tc.prefill`)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from press_helpers import EIGHT_ROWS, kept_positions, oracle_mass_rtol, random_rows

import tokcomp_jax as tc
from tokcomp_jax.cache import LayerCache
from tokcomp_jax.presses.a2sf import a2sf
from tokcomp_jax.presses.base import Budget, Observation, scorer_press
from tokcomp_jax.presses.lacache import lacache
from tokcomp_jax.presses.observed_attention import init_mass, observe_mass

ALPHA, WINDOW = 0.9, 4
A2SF = a2sf(0.5, forgetting_factor=ALPHA, window_size=WINDOW)
LADDER = lacache(0.5, num_layers=2, span=1, n_sink=4, window_size=4)  # blocks of 2: layer 0 even, layer 1 odd


# A2SF ---------------------------------------------------------------------------------------------

_CAPTURED = {}  # layer index -> [(positions, queries, valid, keys, state)] of the current spied prefill


def _capture(positions, queries, valid, keys, state, index):
    _CAPTURED.setdefault(int(index), []).append((positions, queries, valid, keys, state))


def _spied_compress(layer, obs, state, **extra):
    """A2SF, handing each chunk's queries, the cache before compression and the new state to the host."""
    new_layer, new_state = A2SF.compress(layer, obs, state, **extra)
    jax.debug.callback(_capture, obs.positions, obs.queries, obs.valid, layer.keys, new_state, obs.layer_index)
    return new_layer, new_state


SPIED = tc.presses.Press(A2SF.init, _spied_compress)


def _spied_prefill(model, rows, chunk_size):
    """Prefill with `SPIED`: the cache and, per layer, the chunks' captures in order."""
    _CAPTURED.clear()
    _, cache = tc.prefill(model, rows, press=SPIED, chunk_size=chunk_size)
    jax.effects_barrier()
    return cache, {index: sorted(calls, key=lambda call: int(np.max(np.asarray(call[0]))))  # chunk order
                   for index, calls in _CAPTURED.items()}


@pytest.fixture(scope="module")
def chunked(model):
    """The ragged rows and `_spied_prefill` of them with chunks of 8, 16 and 64 tokens."""
    rows = random_rows(EIGHT_ROWS, seed=1)
    return rows, {chunk_size: _spied_prefill(model, rows, chunk_size) for chunk_size in (8, 16, 64)}


def _oracle_scores(queries, keys, group, alpha):
    """sum_i alpha ** (n - 1 - i) * softmax(q_i k^T / sqrt(D))[j] over the causal rows of one prompt,
    summed over each KV head's query group: `[Hkv, n]` from queries `[n, H, D]`, keys `[Hkv, n, D]`."""
    length, heads, dim = queries.shape
    weights = alpha ** np.arange(length - 1, -1, -1, dtype=np.float64)
    scores = np.zeros((heads // group, length))
    for h in range(heads):
        logits = queries[:, h] @ keys[h // group].T / np.sqrt(dim)
        logits[np.arange(length)[None] > np.arange(length)[:, None]] = -np.inf
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        scores[h // group] += weights @ (probs / probs.sum(-1, keepdims=True))
    return scores


@pytest.mark.parametrize("chunk_size", [8, 16])
def test_a2sf_scores_and_selection_match_a_numpy_oracle(model, chunked, chunk_size):
    _, runs = chunked
    cache, chunks = runs[chunk_size]
    group = model.config.num_heads // model.config.num_kv_heads
    assert sorted(chunks) == [0, 1] and all(len(calls) == 64 // chunk_size for calls in chunks.values())
    for index, calls in chunks.items():
        queries = np.concatenate([np.asarray(call[1], np.float64) for call in calls], axis=1)  # [B, 64, H, D]
        valid = np.concatenate([np.asarray(call[2]) for call in calls], axis=1)
        keys, state = np.asarray(calls[-1][3], np.float64), np.asarray(calls[-1][4])
        for row, length in enumerate(EIGHT_ROWS):
            row_queries, row_keys = queries[row, valid[row]], keys[row, :, :length]  # slot == position
            expected = _oracle_scores(row_queries, row_keys, group, ALPHA)
            rtol = oracle_mass_rtol(row_queries, row_keys, group, chunks=len(calls))
            np.testing.assert_allclose(state[row, :, :length], expected, rtol=rtol, atol=0)
            for head in range(expected.shape[0]):
                best = np.argsort(-expected[head, :length - WINDOW], kind="stable")[:length // 2 - WINDOW]
                top = sorted(best.tolist() + list(range(length - WINDOW, length)))
                assert kept_positions(cache, row)[index][head] == top, (index, row, head)


def test_a2sf_selection_does_not_depend_on_the_chunk_size(chunked):
    rows, runs = chunked
    kept = {size: [kept_positions(cache, row) for row in range(len(rows))] for size, (cache, _) in runs.items()}
    assert kept[8] == kept[16] == kept[64]


def test_a2sf_without_forgetting_ranks_as_accumulated_attention(model):
    rows = random_rows(EIGHT_ROWS, seed=3)
    accumulated = scorer_press(lambda layer, obs, state: state.mass, Budget(0.5), init=init_mass, observe=observe_mass)
    _, theirs = tc.prefill(model, rows, press=accumulated, chunk_size=64)
    _, ours = tc.prefill(model, rows, press=a2sf(0.5, forgetting_factor=1.0, window_size=0), chunk_size=64)
    assert [kept_positions(ours, row) for row in range(len(rows))] == \
        [kept_positions(theirs, row) for row in range(len(rows))]


def test_a2sf_batch_of_ragged_rows_keeps_what_each_row_keeps_alone(model, chunked):
    rows, runs = chunked
    cache, _ = runs[64]  # one chunk: one program per row alone
    for index, row in enumerate(rows):
        _, alone = tc.prefill(model, [row], press=A2SF, chunk_size=64)
        assert kept_positions(cache, index) == kept_positions(alone, 0), f"row {index}"
        assert np.asarray(cache.lengths[:, index]).tolist() == [[len(row) // 2] * 2] * 2
        assert all(set(range(len(row) - WINDOW, len(row))) <= set(head)  # the window is always kept
                   for layer in kept_positions(cache, index) for head in layer)


# LaCache ------------------------------------------------------------------------------------------

def _lacache_alone(press, length, layer_index, capacity=None):
    """The positions that `press` keeps of a one-row, one-head cache holding `length` entries in
    `capacity` slots (default `length`)."""
    capacity = capacity or length
    layer = LayerCache(keys=jnp.zeros((1, 1, capacity, 8)), values=jnp.zeros((1, 1, capacity, 8)),
                       positions=jnp.where(jnp.arange(capacity) < length, jnp.arange(capacity), -1)[None, None],
                       lengths=jnp.full((1, 1), length, jnp.int32))
    compressed = _jitted_compress(press, layer_index)(layer)
    return np.asarray(compressed.positions[0, 0, :int(compressed.lengths[0, 0])]).tolist()


@functools.cache
def _jitted_compress(press, layer_index):
    """`press.compress` under `jax.jit` for the last chunk of layer `layer_index` (LaCache reads no queries)."""
    zeros = jnp.zeros((1, 1, 2, 8))
    obs = Observation(zeros, zeros, zeros[:, :, 0], jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool),
                      layer_index, 0, True, np.ones(4, np.float32))
    return jax.jit(lambda layer: press.compress(layer, obs, None)[0])


@pytest.mark.parametrize("tokens, expected", [
    # sinks 0-1, window 18-19; ladder blocks of 2 from position 2: layer 0 keeps the first, layer 1 the second.
    (12, [[0, 1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 19], [0, 1, 3, 5, 7, 9, 11, 13, 15, 17, 18, 19]]),
    # one pass leaves 2 to spare: the most recent entries the ladder dropped.
    (14, [[0, 1, 2, 4, 6, 8, 10, 12, 14, 15, 16, 17, 18, 19], [0, 1, 3, 5, 7, 9, 11, 13, 14, 15, 16, 17, 18, 19]]),
    # a second pass on what the first kept (iterative compaction): every other ladder entry.
    (8, [[0, 1, 2, 6, 10, 14, 18, 19], [0, 1, 5, 9, 13, 17, 18, 19]]),
])
def test_lacache_keeps_the_hand_checked_ladder(tokens, expected):
    press = lacache(tokens=tokens, num_layers=2, span=1, n_sink=2, window_size=2)
    assert [_lacache_alone(press, 20, index) for index in range(2)] == expected


# The official code's pattern (GATECH-EIC/LaCache, LongBench/lacache/kv_cache.py: `LaCache(cache_size=40,
# start_size=4, span=3, overlap=1)` on 60 tokens and 8 layers; blocks of 4, 2 kept, period 3 in depth).
OFFICIAL = ["######..##..##..##..##..##..##..##..##..##..################",
            "####.##..##..##..##..##..##..##..##..##..##.################",
            "####..##..##..##..##..##..##..##..##..##..##################"]


def test_lacache_forms_the_official_ladder_across_layers():
    press = lacache(tokens=40, num_layers=8, span=3, overlap=1, n_sink=4)
    kept = [_lacache_alone(press, 60, index) for index in range(4)]
    for index, positions in enumerate(kept):
        assert positions == [p for p, c in enumerate(OFFICIAL[index % 3]) if c == "#"], index
    assert kept[0] != kept[1] != kept[2] != kept[0] and kept[3] == kept[0]  # the ladder, period 3


def test_lacache_keeps_its_budget_and_a_ragged_batch_keeps_what_each_row_keeps_alone(model):
    rows = random_rows(EIGHT_ROWS, seed=4)
    _, cache = tc.prefill(model, rows, press=LADDER, chunk_size=64)
    for index, row in enumerate(rows):
        kept = kept_positions(cache, index)
        assert kept == [[_lacache_alone(LADDER, len(row), layer, 64)] * 2 for layer in range(2)], f"row {index}"
        assert np.asarray(cache.lengths[:, index]).tolist() == [[len(row) // 2] * 2] * 2
        protected = set(range(len(row) - 4, len(row))) | (set(range(4)) if len(row) // 2 >= 8 else set())
        assert all(protected <= set(head) for layer in kept for head in layer)  # the window, then the sinks
        assert (kept[0] != kept[1]) == (len(row) // 2 > 8)  # the layers differ once ladder entries are kept


def test_bad_arguments():
    for kwargs in ({"forgetting_factor": 0.0}, {"forgetting_factor": 1.5}, {"window_size": -1}):
        with pytest.raises(ValueError):
            a2sf(0.5, **kwargs)
    for kwargs in ({"num_layers": 2}, {"num_layers": 8, "span": 3, "overlap": 3}, {"num_layers": 0, "span": 1},
                   {"num_layers": 2, "span": 1, "n_sink": -1}):
        with pytest.raises(ValueError):
            lacache(0.5, **kwargs)
    with pytest.raises(ValueError):
        a2sf(1.0)
