"""KV-cache presses on a tiny model: budgets, batches of ragged rows, memory, selection oracles."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tokcomp_jax as tc
from tokcomp_jax.presses import Budget, keep_top
from press_helpers import EIGHT_ROWS, kept_positions, random_rows

PRESSES = {
    "streaming_llm": tc.presses.streaming_llm,
    "knorm": tc.presses.knorm,
    "snapkv": lambda ratio=None, **kw: tc.presses.snapkv(ratio, window_size=8, **kw),
}
LENGTHS = EIGHT_ROWS


@pytest.mark.parametrize("name", list(PRESSES))
def test_batch_of_ragged_rows_keeps_what_each_row_keeps_alone(model, name):
    press = PRESSES[name](0.5)
    # Distinct tokens: a repeated token has the same key norm in layer 0 (RoPE keeps norms), an exact
    # tie whose winner is arbitrary.
    rows = random_rows(LENGTHS, distinct=True)
    _, cache = tc.prefill(model, rows, press=press, chunk_size=16)
    for index, row in enumerate(rows):
        _, alone = tc.prefill(model, [row], press=press, chunk_size=16)
        assert kept_positions(cache, index) == kept_positions(alone, 0), f"row {index}"
        kept = max(1, int(len(row) * 0.5))
        assert np.asarray(cache.layers[0].lengths[index]).tolist() == [kept, kept]


@pytest.mark.parametrize("name", list(PRESSES))
@pytest.mark.parametrize("budget", [dict(ratio=0.25), dict(ratio=0.75), dict(tokens=10)])
def test_cache_memory_follows_the_budget(model, name, budget):
    rows = random_rows(LENGTHS, seed=1)
    ratio = budget.get("ratio")
    press = PRESSES[name](**({"ratio": ratio} if ratio is not None else {"tokens": budget["tokens"]}))
    _, full = tc.prefill(model, rows)
    _, small = tc.prefill(model, rows, press=press)
    longest = max(LENGTHS)
    kept = Budget(**budget).kept_count(longest)
    assert small.capacities == (kept,) * len(small.layers)
    overhead = sum(layer.lengths.nbytes for layer in full.layers) + full.num_seen.nbytes
    position_bytes = sum(layer.positions.nbytes for layer in small.layers)
    if ratio is not None:
        assert small.nbytes - overhead - position_bytes <= (1 - ratio) * (full.nbytes - overhead) + 1e-9
    for row, length in enumerate(LENGTHS):
        assert np.asarray(small.layers[1].lengths[row]).tolist() == [Budget(**budget).kept_count(length)] * 2


def test_kept_entries_are_the_original_ones(model):
    """Compaction moves entries without changing them: keys/values equal the full cache's."""
    rows = random_rows(LENGTHS[:3], seed=2)
    _, full = tc.prefill(model, rows)
    _, small = tc.prefill(model, rows, press=tc.presses.knorm(0.5))
    for layer, full_layer in zip(small.layers, full.layers):
        for b in range(3):
            for h in range(2):
                n = int(layer.lengths[b, h])
                positions = np.asarray(layer.positions[b, h, :n])
                assert (np.diff(positions) > 0).all()  # kept in their original order
                np.testing.assert_array_equal(layer.keys[b, h, :n], full_layer.keys[b, h, positions])
                np.testing.assert_array_equal(layer.values[b, h, :n], full_layer.values[b, h, positions])


def test_streaming_llm_keeps_sinks_and_the_recent_window(model):
    _, cache = tc.prefill(model, random_rows([40, 21]), press=tc.presses.streaming_llm(0.5))
    assert kept_positions(cache, 0)[0][0] == [0, 1, 2, 3] + list(range(24, 40))
    assert kept_positions(cache, 1)[1][1] == [0, 1, 2, 3] + list(range(15, 21))


def test_knorm_keeps_the_smallest_key_norms(model):
    rows = random_rows([37])
    _, full = tc.prefill(model, rows)
    _, small = tc.prefill(model, rows, press=tc.presses.knorm(0.5))
    for layer, full_layer in zip(small.layers, full.layers):
        norms = np.linalg.norm(np.asarray(full_layer.keys[0, :, :37]), axis=-1)
        for h in range(2):
            assert _kept_head(layer, h) == sorted(np.argsort(norms[h])[:18].tolist())


def _kept_head(layer, h):
    return sorted(np.asarray(layer.positions[0, h, :int(layer.lengths[0, h])]).tolist())


def test_snapkv_against_a_numpy_oracle(model):
    """Window attention (last 8 queries), mean over the window, avg-pool 5, mean over the group."""
    row = random_rows([30])[0]
    _, full = tc.prefill(model, [row])
    captured = {}
    base = tc.presses.snapkv(0.5, window_size=8)

    def spy(layer, obs, state, **extra):  # hands the layer's keys and queries to the host
        jax.debug.callback(lambda k, q, i=obs.layer_index: captured.setdefault(i, (k, q)), layer.keys, obs.queries)
        return base.compress(layer, obs, state, **extra)

    _, small = tc.prefill(model, [row], press=tc.presses.Press(base.init, spy))
    assert sorted(captured) == [0, 1]
    for index, (layer_keys, layer_queries) in captured.items():
        keys = np.asarray(layer_keys[0, :, :30], np.float64)  # [Hkv, S, D]
        queries = np.asarray(layer_queries[0, -8:], np.float64)  # [W, H, D]
        scores = np.zeros((2, 22))
        for h in range(4):
            kv = h // 2
            logits = queries[:, h] @ keys[kv].T / np.sqrt(8)  # [W, S]
            logits[np.arange(30)[None] > np.arange(22, 30)[:, None]] = -np.inf
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            mean = probs[:, :22].mean(0)
            pooled = np.convolve(np.pad(mean, 2), np.ones(5) / 5, mode="valid")
            scores[kv] += pooled / 2
        for kv in range(2):
            expected = sorted(np.argsort(-scores[kv])[:7].tolist() + list(range(22, 30)))
            assert _kept_head(small.layers[index], kv) == expected


def test_snapkv_budget_smaller_than_its_window_keeps_the_most_recent(model):
    _, cache = tc.prefill(model, random_rows([20]), press=tc.presses.snapkv(tokens=5, window_size=8))
    assert kept_positions(cache, 0) == [[list(range(15, 20))] * 2] * 2


def test_presses_jit_and_compile_once_per_configuration(model):
    assert tc.presses.snapkv(0.5) is tc.presses.snapkv(0.5)
    assert tc.presses.snapkv(0.5) is not tc.presses.snapkv(0.25)
    layer = tc.LayerCache.empty(2, 2, 16, 8)
    layer = dataclasses.replace(layer, lengths=jnp.array([[16, 16], [9, 9]], jnp.int32),
                                positions=jnp.broadcast_to(jnp.arange(16), (2, 2, 16)))
    scores = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 16)), jnp.float32)
    jitted = jax.jit(keep_top, static_argnames="capacity")(layer, scores, jnp.array([[4, 4], [2, 2]]), capacity=6)
    assert jitted.capacity == 6 and jitted.lengths.tolist() == [[4, 4], [2, 2]]
    best = np.argsort(-np.asarray(scores[1, 0, :9]))[:2]
    assert np.asarray(jitted.positions[1, 0, :2]).tolist() == sorted(best.tolist())
    assert np.asarray(jitted.positions[1, 0, 2:]).tolist() == [-1] * 4


def test_generate_with_a_press_leaves_room_for_new_tokens(model):
    rows = random_rows([30, 12])
    result = tc.generate_ids(model, rows, max_new_tokens=5, press=tc.presses.knorm(0.5))
    assert [len(t) for t in result.tokens] == [5, 5]
    assert np.asarray(result.cache.layers[0].lengths).tolist() == [[15 + 5] * 2, [6 + 5] * 2]


@pytest.mark.parametrize("kwargs, message", [
    (dict(ratio=1.0), "ratio"), (dict(ratio=-0.1), "ratio"), (dict(), "exactly one"),
    (dict(ratio=0.5, tokens=3), "exactly one"), (dict(tokens=0), "tokens"),
])
def test_bad_budgets_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Budget(**kwargs)


def test_snapkv_needs_chunks_as_long_as_its_window(model):
    with pytest.raises(ValueError, match="window_size=64"):
        tc.prefill(model, random_rows([100]), press=tc.presses.snapkv(0.5), chunk_size=32)


def test_press_state_carries_across_prefill_chunks(model):
    """A press that counts the tokens it observed keeps the most recent entries only if it saw
    every chunk of every row (and the oldest otherwise)."""

    def score(layer, obs, seen):
        saw_all = (seen == layer.lengths[:, 0])[:, None, None]
        return jnp.where(saw_all, layer.positions, -layer.positions).astype(jnp.float32)

    def observe(seen, layer, obs):
        return seen + jnp.sum(obs.valid, axis=1)

    press = tc.presses.scorer_press(score, Budget(tokens=4), observe=observe,
                                    init=lambda layer, index: jnp.zeros(layer.lengths.shape[0], jnp.int32))
    rows = random_rows([30, 9, 21])
    _, cache = tc.prefill(model, rows, press=press, chunk_size=8)
    for index, row in enumerate(rows):
        assert kept_positions(cache, index)[1] == [list(range(len(row) - 4, len(row)))] * 2
