"""TOVA, KeyDiff and random eviction: batches of ragged rows, oracles, and the random press's
determinism and uniformity (kvpress parity: test_presses_kvpress.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import tokcomp_jax as tc
from tokcomp_jax.presses.base import Observation, Press
from tokcomp_jax.presses.keydiff import keydiff
from tokcomp_jax.presses.random_press import random
from tokcomp_jax.presses.tova import _mean_over_heads, tova
from press_helpers import EIGHT_ROWS, kept_positions, random_rows
from tolerances import gamma, roundoff

PRESSES = {"tova": tova, "keydiff": keydiff, "random": random}


@pytest.mark.parametrize("name", list(PRESSES))
def test_batch_of_ragged_rows_keeps_what_each_row_keeps_alone(model, name):
    press = PRESSES[name](0.5)
    rows = random_rows(EIGHT_ROWS)
    _, cache = tc.prefill(model, rows, press=press, chunk_size=32)  # 40 and 64 span two chunks
    for index, row in enumerate(rows):
        _, alone = tc.prefill(model, [row], press=press, chunk_size=32)
        assert kept_positions(cache, index) == kept_positions(alone, 0), f"row {index}"
        kept = max(1, int(len(row) * 0.5))
        assert np.asarray(cache.layers[1].lengths[index]).tolist() == [kept, kept]


def test_tova_against_a_numpy_oracle(model):
    """The last query's attention, averaged over all 4 query heads: the same tokens in both KV
    heads, the last token always among them."""
    row = random_rows([30], seed=4)[0]
    captured = {}
    base = tova(0.5)

    def spy(layer, obs, state, **extra):  # hands the layer's keys and queries to the host
        jax.debug.callback(lambda k, q, i=obs.layer_index: captured.setdefault(i, (k, q)), layer.keys, obs.queries)
        return base.compress(layer, obs, state, **extra)

    _, small = tc.prefill(model, [row], press=Press(base.init, spy))
    assert sorted(captured) == [0, 1]
    for index, (layer_keys, layer_queries) in captured.items():
        keys = np.asarray(layer_keys[0, :, :30], np.float64)  # [Hkv, S, D]
        query = np.asarray(layer_queries[0, -1], np.float64)  # [H, D]
        scores = np.zeros(30)
        for h in range(4):
            logits = keys[h // 2] @ query[h] / np.sqrt(8)
            probs = np.exp(logits - logits.max())
            scores += probs / probs.sum() / 4
        expected = sorted(np.argsort(-scores[:29])[:14].tolist() + [29])
        assert kept_positions(small, 0)[index] == [expected, expected]


def test_tova_budget_of_one_keeps_the_last_token(model):
    _, cache = tc.prefill(model, random_rows([23, 9]), press=tova(tokens=1))
    assert kept_positions(cache, 0) == [[[22]] * 2] * 2 and kept_positions(cache, 1) == [[[8]] * 2] * 2


def test_tova_averages_heads_by_token_even_when_kv_heads_hold_different_entries():
    """After a per-head press (e.g. in a chain) KV heads hold different tokens: each entry gets the
    attention its token draws in every KV head that still holds it. Against the float64 sums here,
    the float32 side rounds the inputs and the division (2u) and sums at most `kv_heads` positive
    terms (γ̃(kv_heads)), relative."""
    rng = np.random.default_rng(0)
    batch, kv_heads, capacity = 2, 3, 12
    positions = np.full((batch, kv_heads, capacity), -1)
    lengths = rng.integers(4, capacity + 1, (batch, kv_heads))
    for b in range(batch):
        for k in range(kv_heads):
            positions[b, k, :lengths[b, k]] = np.sort(rng.choice(20, lengths[b, k], replace=False))
    attention = rng.random((batch, kv_heads, capacity)) * (positions >= 0)
    zeros = jnp.zeros((batch, kv_heads, capacity, 4))
    layer = tc.LayerCache(keys=zeros, values=zeros,
                          positions=jnp.asarray(positions, jnp.int32), lengths=jnp.asarray(lengths, jnp.int32))
    got = np.asarray(jax.jit(_mean_over_heads, static_argnums=2)(jnp.asarray(attention, jnp.float32), layer, 6))
    for b in range(batch):
        by_token = {}
        for k in range(kv_heads):
            for c in range(lengths[b, k]):
                by_token[positions[b, k, c]] = by_token.get(positions[b, k, c], 0.0) + attention[b, k, c]
        for k in range(kv_heads):
            for c in range(lengths[b, k]):
                relative = gamma(kv_heads) + 2 * roundoff(np.float32)
                assert got[b, k, c] == pytest.approx(by_token[positions[b, k, c]] / 6, rel=relative, abs=0)


def test_random_is_deterministic_given_the_seed_and_covers_the_budget(model):
    rows = random_rows([50, 33], seed=5)
    _, first = tc.prefill(model, rows, press=random(0.5, seed=7), chunk_size=64)
    _, again = tc.prefill(model, rows, press=random(0.5, seed=7), chunk_size=64)
    _, other = tc.prefill(model, rows, press=random(0.5, seed=8), chunk_size=64)
    for row, length in enumerate((50, 33)):
        kept = kept_positions(first, row)
        assert kept == kept_positions(again, row)
        assert kept != kept_positions(other, row)
        assert kept[0][0] != kept[0][1] and kept[0] != kept[1]  # heads and layers draw independently
        for layer in kept:
            for head in layer:
                assert len(head) == len(set(head)) == length // 2 and set(head) <= set(range(length))
    _, small = tc.prefill(model, rows, press=random(tokens=10, seed=7), chunk_size=64)
    assert all(len(head) == 10 for row in (0, 1) for layer in kept_positions(small, row) for head in layer)


def test_random_keeps_a_uniform_random_subset():
    """Over 1024 independent draws (256 KV heads, 4 seeds) of 32 kept out of 64: each position's
    keep count is Binomial(1024, 1/2); with exactly 32 kept per draw, the counts' Pearson statistic
    times (N - 1) / N is asymptotically chi-squared with N - 1 degrees of freedom. Independence of
    the heads: the overlap of two heads' subsets is hypergeometric (mean 16)."""
    n, kv_heads, seeds = 64, 256, 4
    layer = tc.LayerCache(keys=jnp.zeros((1, kv_heads, n, 4)), values=jnp.zeros((1, kv_heads, n, 4)),
                          positions=jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (1, kv_heads, n)),
                          lengths=jnp.full((1, kv_heads), n, jnp.int32))
    obs = Observation(queries=jnp.zeros((1, n, kv_heads, 4)), pre_rope_queries=jnp.zeros((1, n, kv_heads, 4)),
                      hidden_states=jnp.zeros((1, n, 8)), positions=jnp.arange(n)[None], valid=jnp.ones((1, n), bool),
                      layer_index=0, room=0, last_chunk=True, inv_freq=np.ones(2, np.float32))
    kept = np.zeros((seeds, kv_heads, n), bool)
    for seed in range(seeds):
        small, _ = random(0.5, seed=seed).compress(layer, obs, None)
        assert (np.asarray(small.lengths) == 32).all()
        np.put_along_axis(kept[seed], np.asarray(small.positions[0]), True, axis=-1)
    assert (kept.sum(-1) == 32).all()
    draws, p = seeds * kv_heads, 0.5
    counts = kept.sum(axis=(0, 1))
    statistic = np.sum((counts - draws * p) ** 2) / (draws * p * (1 - p)) * (n - 1) / n
    assert scipy.stats.chi2.sf(statistic, n - 1) > 1e-3
    shared = (kept[:, 0::2] & kept[:, 1::2]).sum(-1).ravel()  # 512 disjoint pairs of heads
    hypergeometric = scipy.stats.hypergeom(n, 32, 32)
    z = (shared.mean() - hypergeometric.mean()) / np.sqrt(hypergeometric.var() / shared.size)
    assert abs(z) < 4
