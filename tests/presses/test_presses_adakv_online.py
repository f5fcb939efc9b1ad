"""AdaKV's per-head budgets stored ragged (memory, selection oracle, attention over the pool), and
compression while the cache fills: after every prefill chunk and every N decoding steps."""
import kvpress
import numpy as np
import pytest
import torch

import tokcomp_jax as tc
from tokcomp_jax.cache import KVCache, LayerCache
from tokcomp_jax.presses import Budget
from press_helpers import EIGHT_ROWS, kept_positions, random_rows
from tolerances import model_tolerance

P = tc.presses
LENGTHS = EIGHT_ROWS


def head_sets(cache, row=0):
    """Per layer and KV head, the set of positions row `row` holds."""
    return [[set(head[head >= 0].tolist()) for head in np.asarray(positions[row])] for positions in cache.positions]


def as_uniform(cache: KVCache) -> KVCache:
    """The same entries as a ragged cache, in a uniform cache of the pool's size per head."""
    layers = []
    for layer in cache.layers:
        batch, slots, dim = layer.keys.shape
        heads = layer.lengths.shape[1]
        keys, values = np.zeros((2, batch, heads, slots, dim), np.float32)
        positions = np.full((batch, heads, slots), -1, np.int32)
        for b in range(batch):
            for h in range(heads):
                start, n = int(layer.starts[b, h]), int(layer.lengths[b, h])
                keys[b, h, :n] = layer.keys[b, start:start + n]
                values[b, h, :n] = layer.values[b, start:start + n]
                positions[b, h, :n] = layer.positions[b, start:start + n]
        layers.append(LayerCache(keys, values, positions, layer.lengths))
    return KVCache(tuple(layers), cache.num_seen)


# AdaKV --------------------------------------------------------------------------------------------

def test_adakv_batch_of_ragged_rows_keeps_what_each_row_keeps_alone(model):
    press = P.adakv(P.snapkv(0.5, window_size=8))
    rows = random_rows(LENGTHS)
    _, cache = tc.prefill(model, rows, press=press, chunk_size=16)
    for index, row in enumerate(rows):
        _, alone = tc.prefill(model, [row], press=press, chunk_size=16)
        assert head_sets(cache, index) == head_sets(alone), f"row {index}"
        assert int(cache.layers[0].lengths[index].sum()) == 2 * Budget(0.5).kept_count(len(row))


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_adakv_memory_follows_the_layer_budget(model, ratio):
    rows = random_rows(LENGTHS, seed=1)
    _, full = tc.prefill(model, rows)
    _, small = tc.prefill(model, rows, press=P.adakv(P.knorm(ratio)))
    assert all(isinstance(layer, tc.RaggedLayerCache) for layer in small.layers)
    overhead = sum(layer.lengths.nbytes + layer.starts.nbytes for layer in small.layers) + small.num_seen.nbytes
    position_bytes = sum(layer.positions.nbytes for layer in small.layers)
    full_kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in full.layers)
    assert small.nbytes - overhead - position_bytes <= (1 - ratio) * full_kv
    heads_differ = any(len(set(np.asarray(layer.lengths[b]).tolist())) > 1 for layer in small.layers
                       for b in range(len(rows)))
    assert heads_differ  # the budget really is split unevenly between the heads


def test_adakv_keeps_the_best_scores_over_all_heads(model):
    """Without the safeguard, knorm's AdaKV keeps each layer's smallest key norms over all heads."""
    rows = random_rows([45])
    _, full = tc.prefill(model, rows)
    _, small = tc.prefill(model, rows, press=P.adakv(P.knorm(0.5), alpha_safeguard=0.0))
    for layer, full_layer in zip(head_sets(small), full.layers):
        norms = np.linalg.norm(np.asarray(full_layer.keys[0, :, :45]), axis=-1)  # [Hkv, S]
        best = np.argsort(norms, axis=None)[:2 * 22]
        expected = [set((best[best // 45 == h] % 45).tolist()) for h in range(2)]
        assert layer == expected


def test_adakv_safeguard_of_one_is_the_uniform_press(model):
    rows = random_rows(LENGTHS[:4], seed=2)
    _, uniform = tc.prefill(model, rows, press=P.knorm(0.5))
    _, ragged = tc.prefill(model, rows, press=P.adakv(P.knorm(0.5), alpha_safeguard=1.0))
    for row in range(4):
        assert [[set(h) for h in layer] for layer in kept_positions(uniform, row)] == head_sets(ragged, row)


def test_attention_over_the_ragged_pool_equals_the_same_entries_uniform(model):
    """Decoding on a ragged cache (appending into each head's segment) gives the logits of a
    uniform cache holding the same entries (other orders of the same sums: `model_tolerance`)."""
    rows = random_rows([30, 21, 26], seed=4)
    _, ragged = tc.prefill(model, rows, press=P.adakv(P.knorm(0.5)), capacity=30 + 4)
    uniform = as_uniform(ragged)
    for step in range(4):
        token = np.array([step + 1, 7, 3 * step])
        ours, ragged = tc.decode(model, token, ragged)
        reference, uniform = tc.decode(model, token, uniform)
        tolerance = model_tolerance(model.config, 30 + 4, np.abs(np.asarray(reference)).max())
        np.testing.assert_allclose(ours, reference, rtol=0, atol=tolerance)
    with pytest.raises(ValueError, match="the cache is full"):
        tc.decode(model, np.array([1, 2, 3]), ragged)


def test_adakv_generation_and_misuse(model):
    press = P.adakv(P.knorm(0.5))
    result = tc.generation.generate_ids(model, random_rows([20, 9]), max_new_tokens=6, press=press)
    assert [len(tokens) for tokens in result.tokens] == [6, 6]
    with pytest.raises(ValueError, match="scoring press"):
        P.adakv(P.chain(P.knorm(0.5)))
    with pytest.raises(ValueError, match="alpha_safeguard"):
        P.adakv(P.knorm(0.5), alpha_safeguard=1.5)
    with pytest.raises(ValueError, match="apply adakv last"):
        tc.prefill(model, random_rows([20]), press=P.chain(press, P.knorm(0.5)))


# Compression after every prefill chunk -------------------------------------------------------------

def recording(press, shapes):
    """`press`, noting the shape of every cache it is handed (at trace time: shapes are static)."""
    def compress(layer, obs, state, **extra):
        shapes.append(layer.keys.shape)
        return press.compress(layer, obs, state, **extra)
    return press._replace(compress=compress)


def test_chunkwise_peak_cache_is_the_budget_plus_one_chunk(model):
    shapes = []
    press = recording(P.chunkwise(P.knorm(tokens=24)), shapes)
    _, cache = tc.prefill(model, random_rows([200, 150], seed=5), press=press, chunk_size=16, capacity=200 + 3)
    assert max(shape[2] for shape in shapes) == 24 + 16  # not the prompt's 200
    assert cache.capacities == (24 + 3, 24 + 3)
    assert np.asarray(cache.lengths).tolist() == [[[24, 24], [24, 24]]] * 2


@pytest.mark.parametrize("inner, layers", [(P.knorm(tokens=20), 1), (P.streaming_llm(tokens=20), 2)])
def test_chunkwise_equals_one_shot_for_scores_that_do_not_change(model, inner, layers):
    """Knorm's scores (key norms) and StreamingLLM's (sinks and recency) do not depend on what
    comes later, so compressing after every chunk keeps what compressing once keeps: in every
    layer for StreamingLLM, in the first for knorm (deeper keys see a compressed past)."""
    rows = random_rows(LENGTHS, seed=6)
    _, once = tc.prefill(model, rows, press=inner, chunk_size=16)
    _, chunked = tc.prefill(model, rows, press=P.chunkwise(inner), chunk_size=16)
    for row in range(len(rows)):
        assert kept_positions(chunked, row)[:layers] == kept_positions(once, row)[:layers]


def test_chunkwise_batch_of_ragged_rows_keeps_what_each_row_keeps_alone(model):
    press = P.chunkwise(P.snapkv(tokens=20, window_size=8))
    rows = random_rows(LENGTHS, seed=7)
    _, cache = tc.prefill(model, rows, press=press, chunk_size=16)
    for index, row in enumerate(rows):
        _, alone = tc.prefill(model, [row], press=press, chunk_size=16)
        assert kept_positions(cache, index) == kept_positions(alone, 0), f"row {index}"


@pytest.mark.parametrize("bad, message", [(lambda: P.chunkwise(P.knorm(0.5)), "budget in tokens"),
                                          (lambda: P.chunkwise(P.h2o(tokens=8)), "accumulates statistics"),
                                          (lambda: P.chunkwise(P.chain(P.knorm(tokens=8))), "scoring press")])
def test_chunkwise_rejects_presses_it_cannot_apply(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


# Compression every N decoding steps ----------------------------------------------------------------

def test_decoding_compression_matches_kvpress_decoding_press(tiny_pair):
    """Greedy tokens with the cache compressed every 5 steps back to 24 entries (knorm) equal
    kvpress `DecodingPress(KnormPress(), compression_interval=5, target_size=24)` in transformers."""
    hf_model, model = tiny_pair
    ids = np.random.default_rng(8).integers(0, 128, 30).tolist()
    ours = tc.generation.generate_ids(model, [ids], max_new_tokens=23, decoding_press=P.knorm(tokens=24),
                                      compress_every=5)
    assert ours.cache.capacities == (24 + 5,) * 2
    assert int(np.max(ours.cache.lengths)) <= 24 + 5
    press = kvpress.DecodingPress(kvpress.KnormPress(), compression_interval=5, target_size=24)
    with torch.no_grad(), press(hf_model):
        theirs = hf_model.generate(torch.tensor([ids]), max_new_tokens=23, do_sample=False, pad_token_id=0)
    assert ours.tokens[0] == theirs[0, len(ids):].tolist()
    plain = tc.generation.generate_ids(model, [ids], max_new_tokens=23)
    assert plain.tokens != ours.tokens  # compression changed the continuation: the check has teeth


def test_decoding_compression_rejects_ratio_budgets(model):
    with pytest.raises(ValueError, match="budget in tokens"):
        tc.generation.generate_ids(model, [[1, 2, 3]], decoding_press=P.knorm(0.5))
    with pytest.raises(ValueError, match="compress_every"):
        tc.generation.generate_ids(model, [[1, 2, 3]], decoding_press=P.knorm(tokens=4), compress_every=0)


def test_decode_step_compiles_once_after_compression(model):
    """Steps between compressions reuse one compiled program: the cache keeps its shape."""
    ids = random_rows([12], seed=9)
    tc.generation.generate_ids(model, ids, max_new_tokens=12, decoding_press=P.knorm(tokens=8), compress_every=4)
    before = tc.generation._sample_and_decode._cache_size()
    tc.generation.generate_ids(model, ids, max_new_tokens=12, decoding_press=P.knorm(tokens=8), compress_every=4)
    assert tc.generation._sample_and_decode._cache_size() == before
