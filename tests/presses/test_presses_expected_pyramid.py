"""Expected Attention and PyramidKV: chunk-size independence, ragged batches, per-layer capacities
and memory (kvpress parity: test_presses_kvpress.py)."""
import kvpress
import numpy as np
import pytest

import tokcomp_jax as tc
from tokcomp_jax.presses.expected_attention import expected_attention, observe_queries
from tokcomp_jax.presses.pyramidkv import layer_budget, pyramidkv
from press_helpers import EIGHT_ROWS, RAGGED, kept_positions, random_rows
from tolerances import gamma

LENGTHS = RAGGED


def test_query_statistics_merged_over_chunks_equal_the_whole_prompts():
    """Against float64 statistics of the same float32 queries, one side carries error: a sum of the
    row's n queries (mean) or of their n centred products (scatter), merged chunk by chunk with
    four more roundings per chunk (the difference of the means, its share, their product, the sum)
    of values no larger than the largest query (mean) or the largest sum of |products| / n
    (scatter): γ̃(n + 4 * chunks) relative to that."""
    rng = np.random.default_rng(0)
    queries = rng.normal(3.0, 2.0, (2, 40, 3, 4)).astype(np.float32)
    weights = np.ones((2, 40), np.float32)
    weights[0, :7] = 0  # padding / sinks of row 0
    weights[1, 30:33] = 0
    stats = None
    chunks = range(0, 40, 6)  # chunks of 6 and a last one of 4
    for start in chunks:
        stats = observe_queries(stats, queries[:, start:start + 6], weights[:, start:start + 6])
    for row in range(2):
        q = queries[row, weights[row] > 0].astype(np.float64)  # [N, H, D]
        relative = gamma(len(q) + 4 * len(chunks) + 1)  # + 1: the division by N of the scatter here
        np.testing.assert_array_equal(stats.count[row], len(q))  # a sum of ones: exact
        np.testing.assert_allclose(stats.mean[row], q.mean(0), rtol=0, atol=relative * np.abs(q).max())
        for h in range(3):
            cov = np.cov(q[:, h].T, bias=True)
            centred = np.abs(q[:, h] - q[:, h].mean(0))
            magnitude = (centred.T @ centred).max() / len(q)
            np.testing.assert_allclose(stats.scatter[row, h] / len(q), cov, rtol=0, atol=relative * magnitude)


def test_expected_attention_does_not_depend_on_the_chunk_size(model):
    rows = random_rows(LENGTHS, seed=4)
    press = expected_attention(0.5)
    kept = []
    for chunk_size in (8, 16, 64):
        _, cache = tc.prefill(model, rows, press=press, chunk_size=chunk_size)
        kept.append([kept_positions(cache, row) for row in range(len(rows))])
    assert kept[0] == kept[1] == kept[2]


@pytest.mark.parametrize("name", ["expected_attention", "pyramidkv"])
def test_batch_of_ragged_rows_keeps_what_each_row_keeps_alone(model, name):
    press = expected_attention(0.5) if name == "expected_attention" else pyramidkv(0.5, num_layers=2, window_size=8)
    rows = random_rows(EIGHT_ROWS)
    _, cache = tc.prefill(model, rows, press=press, chunk_size=16)
    for index, row in enumerate(rows):
        _, alone = tc.prefill(model, [row], press=press, chunk_size=16)
        assert kept_positions(cache, index) == kept_positions(alone, 0), f"row {index}"
        for layer_index, layer in enumerate(cache.layers):
            expected = (max(1, int(len(row) * 0.5)) if name == "expected_attention"
                        else layer_budget(len(row), layer_index, 2, 0.5, 8, 20))
            assert np.asarray(layer.lengths[index]).tolist() == [expected, expected]
        if name == "expected_attention":  # the sinks are always kept
            assert all(set(range(4)) <= set(head) for layer in kept_positions(cache, index) for head in layer)


def test_expected_attention_options_change_the_selection(model):
    rows = random_rows(LENGTHS, seed=5)
    kept = {}
    for options in (dict(), dict(use_covariance=False), dict(use_vnorm=False), dict(n_sink=0)):
        _, cache = tc.prefill(model, rows, press=expected_attention(0.5, **options), chunk_size=16)
        kept[tuple(options)] = [kept_positions(cache, row) for row in range(len(rows))]
    assert len({str(v) for v in kept.values()}) == len(kept)
    _, cache = tc.prefill(model, rows, press=expected_attention(tokens=10))
    assert np.asarray(cache.lengths).max() == 10 and cache.capacities == (10, 10)


def test_pyramid_budgets_follow_kvpress():
    class Config:
        num_hidden_layers = 30

    class Module:
        config = Config()

    for ratio in (0.1, 0.25, 0.5, 0.6, 0.75):
        for window_size in (8, 64):
            press = kvpress.PyramidKVPress(compression_ratio=ratio, window_size=window_size)
            for length in (1, 17, 100, 127, 128, 129, 300, 1000, 4096):
                for layer_index in (0, 7, 29):
                    Module.layer_idx = layer_index
                    assert layer_budget(length, layer_index, 30, ratio, window_size, 20) == \
                        press.get_layer_budget(Module, length)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_pyramid_layers_get_their_own_capacities_and_memory_follows_the_total_budget(ratio):
    model = tc.testing.tiny_llama(seed=3, num_layers=4)
    rows = random_rows((64, 64, 64), seed=1)
    _, full = tc.prefill(model, rows)
    _, small = tc.prefill(model, rows, press=pyramidkv(ratio, num_layers=4, window_size=8), chunk_size=32)
    budgets = tuple(layer_budget(64, index, 4, ratio, 8, 20) for index in range(4))
    assert small.capacities == budgets
    assert np.asarray(small.lengths).tolist() == [[[b, b]] * 3 for b in budgets]
    if ratio < 0.75:
        assert budgets[0] > budgets[1] > budgets[2] > budgets[3]  # the pyramid
    else:
        assert len(set(budgets)) == 1  # below the window: SnapKV's uniform budget
    # Keys and values take (1 - ratio) of the uncompressed bytes, up to rounding each layer's budget.
    overhead = sum(layer.lengths.nbytes for layer in full.layers) + full.num_seen.nbytes
    position_bytes = sum(layer.positions.nbytes for layer in small.layers)
    per_entry = (full.nbytes - overhead) / (4 * 64)  # all rows, heads, keys and values of one position
    assert small.nbytes - overhead - position_bytes <= (1 - ratio) * (full.nbytes - overhead) + 2 * per_entry
    assert sum(budgets) <= 4 * 64 * (1 - ratio) + 2


def test_pyramid_cache_keeps_room_to_generate(model):
    rows = random_rows(LENGTHS, seed=2)
    press = pyramidkv(0.5, num_layers=2, window_size=8)
    result = tc.generate_ids(model, rows, max_new_tokens=5, press=press, chunk_size=16)
    assert [len(tokens) for tokens in result.tokens] == [5] * len(rows)
    lengths = np.asarray(result.cache.lengths)  # [L, B, Hkv]
    for index, row in enumerate(rows):
        for layer_index in range(2):
            assert (lengths[layer_index, index] == layer_budget(len(row), layer_index, 2, 0.5, 8, 20) + 5).all()
    assert result.cache.capacities[0] > result.cache.capacities[1]


def test_bad_arguments():
    with pytest.raises(ValueError):
        pyramidkv(num_layers=2)
    with pytest.raises(ValueError):
        pyramidkv(0.5, num_layers=2, beta=0)
    with pytest.raises(ValueError):
        expected_attention(0.5, n_future_positions=0)
    with pytest.raises(ValueError):
        expected_attention()
