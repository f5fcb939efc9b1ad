"""Bad input to the presses and to `tc.prefill`: a clear error that names the argument, or a
documented result, never an XLA error. Also what a NaN key does to the selection."""
from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tokcomp_jax as tc
from tokcomp_jax.models.rope import inverse_frequencies
from tokcomp_jax.presses import Budget, Observation, keep_top
from tokcomp_jax.presses.pyramidkv import layer_budget
from press_helpers import random_rows
from tolerances import network

FACTORIES = dict(tc.presses.PRESSES, pyramidkv=lambda ratio: tc.presses.pyramidkv(ratio, num_layers=2),
                 lacache=lambda ratio: tc.presses.lacache(ratio, num_layers=2, span=1))
# Factories that take a token budget, with windows that fit the short prompts below.
TOKEN_FACTORIES = {name: (lambda tokens, factory=factory: factory(tokens=tokens))
                   for name, factory in tc.presses.PRESSES.items() if "tokens" in inspect.signature(factory).parameters}
TOKEN_FACTORIES["snapkv"] = lambda tokens: tc.presses.snapkv(tokens=tokens, window_size=8)
TOKEN_FACTORIES["adakv_knorm"] = lambda tokens: tc.presses.adakv(tc.presses.knorm(tokens=tokens))
TOKEN_FACTORIES["adakv_snapkv"] = lambda tokens: tc.presses.adakv(tc.presses.snapkv(tokens=tokens, window_size=8))


def head_entries(layer, b, h):
    """The (positions, keys, values) that row b, KV head h holds, in slot order."""
    n = int(layer.lengths[b, h])
    if layer.keys.ndim == 3:  # a ragged pool: head h's segment starts at starts[b, h]
        pick = slice(int(layer.starts[b, h]), int(layer.starts[b, h]) + n)
        return np.asarray(layer.positions[b, pick]), np.asarray(layer.keys[b, pick]), np.asarray(layer.values[b, pick])
    return (np.asarray(layer.positions[b, h, :n]), np.asarray(layer.keys[b, h, :n]),
            np.asarray(layer.values[b, h, :n]))


def synthetic_inputs(lengths=(16,), nan_at=None, steps=8, seed=0):
    """Rows of `lengths` tokens in 2 KV heads (positions 0..len-1, compacted to the front of a cache
    as long as the longest row), with random keys and values, optionally a NaN in the key at
    `nan_at` = (row, head, slot); and the prompt's last chunk of `steps` tokens, end-aligned."""
    rng = np.random.default_rng(seed)
    batch, capacity = len(lengths), max(lengths)
    lengths = np.asarray(lengths, np.int32)
    filled = np.arange(capacity) < lengths[:, None]
    keys = rng.normal(size=(batch, 2, capacity, 8)).astype(np.float32) * filled[:, None, :, None]
    values = rng.normal(size=(batch, 2, capacity, 8)).astype(np.float32) * filled[:, None, :, None]
    if nan_at is not None:
        keys[nan_at + (2,)] = np.nan
    positions = np.broadcast_to(np.where(filled, np.arange(capacity), -1)[:, None], (batch, 2, capacity))
    layer = tc.LayerCache(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(positions, jnp.int32),
                          jnp.asarray(np.repeat(lengths[:, None], 2, axis=1)))
    t = np.arange(steps)
    valid = t >= steps - np.minimum(lengths, steps)[:, None]
    queries = jnp.asarray(rng.normal(size=(batch, steps, 4, 8)), jnp.float32)
    obs = Observation(queries, queries, jnp.asarray(rng.normal(size=(batch, steps, 16)), jnp.float32),
                      jnp.asarray(np.where(valid, lengths[:, None] - steps + t, -1), jnp.int32), jnp.asarray(valid),
                      0, 0, True, inverse_frequencies(tc.testing.TINY_CONFIG))
    return layer, obs


def compressed(press, layer, obs):
    """`press` on the prompt's last chunk, jitted (one compilation: cheaper than running eagerly)."""
    def run(layer, arrays):
        full = Observation(*arrays, *obs[5:])
        return press.compress(layer, full, press.init(layer, full.layer_index))[0]

    return jax.jit(run)(layer, tuple(obs[:5]))


# Budgets ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_ratio_outside_zero_one_is_rejected(name, ratio):
    with pytest.raises(ValueError, match="ratio .*must be in \\[0, 1\\)"):
        FACTORIES[name](ratio)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_ratio_that_is_not_a_number_is_rejected(name):
    with pytest.raises((TypeError, ValueError), match="ratio"):
        FACTORIES[name]("0.5")


@pytest.mark.parametrize("name", [name for name in TOKEN_FACTORIES if name in tc.presses.PRESSES])
def test_zero_tokens_is_rejected(name):
    with pytest.raises(ValueError, match="tokens .*at least 1"):
        TOKEN_FACTORIES[name](0)


@pytest.mark.parametrize("tokens", [2.5, -3])
def test_tokens_that_is_not_a_positive_integer_is_rejected(tokens):
    with pytest.raises(ValueError, match="tokens"):
        tc.presses.knorm(tokens=tokens)


@pytest.mark.parametrize("kwargs", [dict(), dict(ratio=0.5, tokens=3)])
def test_exactly_one_of_ratio_and_tokens(kwargs):
    with pytest.raises(ValueError, match="exactly one of ratio .* and tokens"):
        tc.presses.knorm(**kwargs)


@pytest.mark.parametrize("name", list(TOKEN_FACTORIES))
def test_token_budget_above_the_prompt_keeps_everything(name):
    """`tokens` is the most entries a (row, head) keeps: a prompt shorter than that is kept whole,
    in order, and the cache is no larger than the prompt needs."""
    layer, obs = synthetic_inputs(lengths=(20, 7))
    out = compressed(TOKEN_FACTORIES[name](100), layer, obs)
    ragged = out.keys.ndim == 3  # per-head budgets (AdaKV): one pool of slots per row
    assert out.capacity == (2 if ragged else 1) * 20
    for b, length in enumerate((20, 7)):
        for h in range(2):
            positions, keys, values = head_entries(out, b, h)
            assert positions.tolist() == list(range(length))
            np.testing.assert_array_equal(keys, layer.keys[b, h, :length])
            np.testing.assert_array_equal(values, layer.values[b, h, :length])


def test_token_budget_above_the_prompt_keeps_everything_in_prefill(model):
    rows = random_rows([20, 7], seed=5)
    _, full = tc.prefill(model, rows)
    _, cache = tc.prefill(model, rows, press=tc.presses.knorm(tokens=100))
    assert cache.capacities == (20, 20)
    config = model.config
    for index, (layer, full_layer) in enumerate(zip(cache.layers, full.layers)):
        for b, row in enumerate(rows):
            # Another compiled program: the same entries up to the float32 rounding of the sums of
            # the layers before and of this layer's projection (`network` of index + 1 layers).
            n = max(config.hidden_size, config.intermediate_size, len(row))
            for h in range(2):
                positions, keys, values = head_entries(layer, b, h)
                assert positions.tolist() == list(range(len(row)))
                for got, full_entries in ((keys, full_layer.keys), (values, full_layer.values)):
                    expected = np.asarray(full_entries[b, h, :len(row)])
                    np.testing.assert_allclose(got, expected, rtol=0,
                                               atol=network(n, index + 1, np.abs(expected).max()))


# Shapes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("ids, match", [
    (np.zeros((2, 3, 4), np.int32), r"ids must be .*shaped \[B, S\]"),
    (np.zeros((2, 3), np.float32), r"ids must be .*integer"),
    ([[]], r"ids: row 0 is empty; every prompt needs at least one token"),
    ([[1, 2, 64]], r"ids must be token ids in \[0, 64\)"),
    ([[1, -2, 3]], r"ids must be token ids in \[0, 64\)"),
])
def test_prefill_rejects_bad_ids(model, ids, match):
    with pytest.raises(ValueError, match=match):
        tc.prefill(model, ids, press=tc.presses.knorm(0.5))


@pytest.mark.parametrize("lengths", [[5, 5, 5], [5], [5, 6], [5, 0], [[5, 5]]])
def test_prefill_rejects_lengths_of_the_wrong_size_or_range(model, lengths):
    with pytest.raises(ValueError, match=r"lengths must hold one value in \[1, 5\] per row of ids"):
        tc.prefill(model, np.zeros((2, 5), np.int32), lengths=lengths, press=tc.presses.knorm(0.5))


def test_prefill_rejects_a_cache_of_another_batch_size(model):
    with pytest.raises(ValueError, match="cache holds 3 rows but ids has 2"):
        tc.prefill(model, np.zeros((2, 5), np.int32), cache=model.init_cache(3, 32), press=tc.presses.knorm(0.5))


@pytest.mark.parametrize("cache_shape", [
    dict(num_layers=3, num_kv_heads=2, head_dim=8),  # one layer too many
    dict(num_layers=2, num_kv_heads=4, head_dim=8),  # other KV heads
    dict(num_layers=2, num_kv_heads=2, head_dim=16),  # other head size
], ids=["num_layers", "num_kv_heads", "head_dim"])
def test_prefill_rejects_a_cache_made_for_another_model(model, cache_shape):
    cache = tc.KVCache.empty(batch=1, capacity=32, **cache_shape)
    with pytest.raises(ValueError, match="cache"):
        tc.prefill(model, np.zeros((1, 5), np.int32), cache=cache, press=tc.presses.knorm(0.5))


def test_prefill_rejects_a_full_cache_and_a_small_capacity(model):
    with pytest.raises(ValueError, match="the cache is full"):
        tc.prefill(model, np.zeros((3, 40), np.int32), cache=model.init_cache(3, 32))
    with pytest.raises(ValueError, match="capacity is 10; raise capacity"):
        tc.prefill(model, np.zeros((1, 40), np.int32), capacity=10, press=tc.presses.knorm(0.5))
    with pytest.raises(ValueError, match="either cache or capacity"):
        tc.prefill(model, np.zeros((3, 5), np.int32), cache=model.init_cache(3, 32), capacity=40)


def test_prefill_rejects_a_chunk_size_below_one_and_below_the_window(model):
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        tc.prefill(model, [[1, 2, 3]], chunk_size=0, press=tc.presses.knorm(0.5))
    with pytest.raises(ValueError, match="window_size=64.*raise chunk_size"):
        tc.prefill(model, random_rows([100]), press=tc.presses.snapkv(0.5), chunk_size=32)


def test_pyramidkv_made_for_fewer_layers_than_the_model_is_rejected(model):
    with pytest.raises(ValueError, match="num_layers=1"):
        tc.prefill(model, random_rows([20]), press=tc.presses.pyramidkv(0.5, num_layers=1, window_size=4))


@pytest.mark.parametrize("make, match", [
    (lambda: tc.presses.snapkv(0.5, kernel_size=4), "kernel_size"),
    (lambda: tc.presses.snapkv(0.5, window_size=0), "window_size"),
    (lambda: tc.presses.streaming_llm(0.5, n_sink=-1), "n_sink"),
    (lambda: tc.presses.expected_attention(0.5, n_future_positions=0), "n_future_positions"),
    (lambda: tc.presses.pyramidkv(num_layers=2), "ratio"),
    (lambda: tc.presses.pyramidkv(0.5, num_layers=0), "num_layers"),
    (lambda: tc.presses.adakv(0.5), "adakv wraps a scoring press"),
    (lambda: tc.presses.adakv(tc.presses.knorm(0.5), alpha_safeguard=2), "alpha_safeguard"),
    (lambda: tc.presses.chain(), "chain takes one or more presses"),
    (lambda: tc.presses.chain(0.5), "chain takes one or more presses"),
])
def test_press_options_are_validated(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# NaN keys --------------------------------------------------------------------------------------
# Documented behaviour: an entry whose score is NaN ranks below every entry with a real score (it is
# dropped first) and the kept count still equals the budget.

NEG_NAN = float(np.copysign(np.nan, -1.0))


def nan_key_inputs(nan_slot=3):
    """One row of 16 tokens, a NaN in the key at slot `nan_slot` of KV head 0; chunks of 8."""
    return synthetic_inputs(lengths=(16,), nan_at=(0, 0, nan_slot))


def kept(layer, h):
    return head_entries(layer, 0, h)[0].tolist()


@pytest.mark.parametrize("nan", [np.nan, NEG_NAN], ids=["nan", "-nan"])
def test_keep_top_ranks_nan_scores_below_every_real_score(nan):
    layer = tc.LayerCache(jnp.zeros((1, 1, 6, 2)), jnp.zeros((1, 1, 6, 2)), jnp.arange(6)[None, None],
                          jnp.array([[6]], jnp.int32))
    scores = jnp.array([[[1.0, nan, 3.0, 2.0, 0.5, nan]]], jnp.float32)
    top = keep_top(layer, scores, jnp.array([[3]]), capacity=3)
    assert top.lengths.tolist() == [[3]]
    assert top.positions.tolist() == [[[0, 2, 3]]]
    # More kept than real scores: every real one, then NaN ones, up to the budget.
    top = keep_top(layer, scores, jnp.array([[5]]), capacity=5)
    assert top.lengths.tolist() == [[5]]
    assert {0, 2, 3, 4} <= set(top.positions[0, 0].tolist())


def test_knorm_drops_the_entry_with_a_nan_key_first():
    layer, obs = nan_key_inputs()
    out = compressed(tc.presses.knorm(0.5), layer, obs)
    assert out.lengths.tolist() == [[8, 8]]
    norms = np.linalg.norm(np.asarray(layer.keys[0]), axis=-1)  # NaN at head 0, slot 3
    for h in range(2):
        real = np.flatnonzero(~np.isnan(norms[h]))
        assert kept(out, h) == sorted(real[np.argsort(norms[h, real])[:8]].tolist())


@pytest.mark.parametrize("make", [lambda: tc.presses.snapkv(0.5, window_size=4),
                                  lambda: tc.presses.adakv(tc.presses.snapkv(0.5, window_size=4))],
                         ids=["snapkv", "adakv_snapkv"])
def test_snapkv_keeps_its_window_whatever_a_nan_key_does_to_the_other_scores(make):
    """A NaN key makes every window query's attention NaN, so every entry outside the window scores
    NaN; the window's entries (real scores) are kept, and the budget is still filled."""
    layer, obs = nan_key_inputs()
    out = compressed(make(), layer, obs)
    counts = np.asarray(out.lengths)
    if out.keys.ndim == 3:  # AdaKV: the row's budget, split between the heads
        assert counts.sum() == 16
    else:
        assert counts.tolist() == [[8, 8]]
    assert {12, 13, 14, 15} <= set(kept(out, 0))


def test_tova_keeps_the_last_token_whatever_a_nan_key_does_to_the_other_scores():
    layer, obs = nan_key_inputs()
    out = compressed(tc.presses.tova(0.5), layer, obs)
    assert out.lengths.tolist() == [[8, 8]]
    for h in range(2):
        assert 15 in kept(out, h)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_a_nan_key_leaves_the_kept_count_at_the_budget(name):
    layer, obs = nan_key_inputs(nan_slot=9)
    factory = {"snapkv": lambda r: tc.presses.snapkv(r, window_size=4),
               "adakv_snapkv": lambda r: tc.presses.adakv(tc.presses.snapkv(r, window_size=4)),
               "pyramidkv": lambda r: tc.presses.pyramidkv(r, num_layers=2, window_size=4),
               "lacache": lambda r: tc.presses.lacache(r, num_layers=2, span=1, n_sink=4)}.get(name, FACTORIES[name])
    out = compressed(factory(0.5), layer, obs)
    counts = np.asarray(out.lengths)
    if name == "pyramidkv":
        assert counts.tolist() == [[layer_budget(16, 0, 2, 0.5, 4, 20)] * 2]
    elif out.keys.ndim == 3:
        assert counts.sum() == 2 * Budget(0.5).kept_count(16)
    else:
        assert counts.tolist() == [[Budget(0.5).kept_count(16)] * 2]
