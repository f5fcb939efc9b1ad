"""Property tests of every press, called directly (`init` then `compress`) on synthetic caches and
observations: budgets, kept entries, identity at ratio 0, determinism, jit and vmap.

The inputs are what `tc.prefill` hands a press on the prompt's last chunk: B ragged rows compacted to
the front of a cache of C slots (C = the longest row, so `room` is 0), and a chunk of T tokens
aligned to the end (each row's last token at index T - 1, padding first, at position -1).
Hypothesis draws the rows' lengths and the random contents; the shape, ratios and layer indices are
fixed, so that each press compiles a handful of programs (the file runs in well under a minute on two
cores).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokcomp_jax as tc
from tokcomp_jax.models.rope import apply_rope, inverse_frequencies
from tokcomp_jax.presses import Budget, Observation
from tokcomp_jax.presses.pyramidkv import layer_budget

HKV, HEADS, DIM, EMBED = 2, 4, 8, 16
NUM_LAYERS = 2  # pyramidkv's num_layers
WINDOW = 4  # SnapKV-like presses: a window that fits the chunks below
INV_FREQ = inverse_frequencies(tc.testing.TINY_CONFIG)  # head_dim 8
# (B, C, T): rows of 1 to C tokens, so some longer than the chunk (the cache holds earlier chunks)
# and some shorter (the chunk starts with padding). One shape: compiled programs are reused.
SHAPE = (3, 24, 16)
# (ratio, layer_index, under_jit_too): static configurations; the rows' lengths and the random
# contents are drawn by hypothesis. Compiling takes most of the time: one jitted program per press
# (and one vmapped), the eager ops compiled once per shape.
CONFIGS = [(0.25, 0, True), (0.9, 1, False)]

# Factories that take a window size get a small one; every other press of PRESSES as it is listed.
SMALL_WINDOW = {
    "snapkv": lambda ratio: tc.presses.snapkv(ratio, window_size=WINDOW),
    "adakv_snapkv": lambda ratio: tc.presses.adakv(tc.presses.snapkv(ratio, window_size=WINDOW)),
    "pyramidkv": lambda ratio: tc.presses.pyramidkv(ratio, num_layers=NUM_LAYERS, window_size=WINDOW),
    "lacache": lambda ratio: tc.presses.lacache(ratio, num_layers=NUM_LAYERS, span=1, n_sink=4),
}
NAMES = list(tc.presses.PRESSES) + ["pyramidkv", "lacache"]  # and the two that need the model's num_layers


def make_press(name: str, ratio: float):
    return SMALL_WINDOW[name](ratio) if name in SMALL_WINDOW else tc.presses.PRESSES[name](ratio)


class Chunk(NamedTuple):
    """The array fields of an `Observation` (the static ones are added by `compress`)."""

    queries: jax.Array
    pre_rope_queries: jax.Array
    hidden_states: jax.Array
    positions: jax.Array
    valid: jax.Array


def make_inputs(shape, lengths, seed):
    """A cache holding each row's `lengths[b]` tokens (positions 0..len-1, in every KV head) and the
    end-aligned last chunk of T tokens of every row, with random keys, values and queries."""
    batch, capacity, steps = shape
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    filled = np.arange(capacity) < lengths[:, None]  # [B, C]
    zero_empty = filled[:, None, :, None]
    keys = rng.normal(size=(batch, HKV, capacity, DIM)).astype(np.float32) * zero_empty
    values = rng.normal(size=(batch, HKV, capacity, DIM)).astype(np.float32) * zero_empty
    positions = np.broadcast_to(np.where(filled, np.arange(capacity), -1)[:, None], (batch, HKV, capacity))
    layer = tc.LayerCache(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(positions, jnp.int32),
                          jnp.asarray(np.repeat(lengths[:, None], HKV, axis=1)))
    t = np.arange(steps)
    valid = t >= steps - np.minimum(lengths, steps)[:, None]  # [B, T]
    chunk_positions = np.where(valid, lengths[:, None] - steps + t, -1).astype(np.int32)
    pre_rope = jnp.asarray(rng.normal(size=(batch, steps, HEADS, DIM)), jnp.float32)
    queries = apply_rope(pre_rope, jnp.asarray(chunk_positions), INV_FREQ)
    hidden = jnp.asarray(rng.normal(size=(batch, steps, EMBED)), jnp.float32)
    return layer, Chunk(queries, pre_rope, hidden, jnp.asarray(chunk_positions), jnp.asarray(valid))


def compress(press, layer_index, layer, chunk):
    """One press call on the prompt's last chunk, as `DecoderLayer` makes it (room 0)."""
    obs = Observation(*chunk, layer_index, 0, True, INV_FREQ)
    out, _ = press.compress(layer, obs, press.init(layer, layer_index))
    return out


@functools.lru_cache(maxsize=None)
def jitted(name, ratio, layer_index):
    return jax.jit(functools.partial(compress, make_press(name, ratio), layer_index))


@functools.lru_cache(maxsize=None)
def vmapped(name, ratio, layer_index):
    return jax.jit(jax.vmap(functools.partial(compress, make_press(name, ratio), layer_index)))


def is_ragged(layer) -> bool:
    """A cache with a budget per KV head (AdaKV): one pool of slots per row, `starts` per head."""
    return layer.keys.ndim == 3


def entries(layer, b, h):
    """The kept (positions, keys, values) of row b, KV head h, in slot order (`layer` in numpy)."""
    n = int(layer.lengths[b, h])
    if is_ragged(layer):
        pick = slice(int(layer.starts[b, h]), int(layer.starts[b, h]) + n)
        return layer.positions[b, pick], layer.keys[b, pick], layer.values[b, pick]
    return layer.positions[b, h, :n], layer.keys[b, h, :n], layer.values[b, h, :n]


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    a, b = jax.device_get((a, b))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Rows whose scores tie exactly, where which entries are kept is left to float rounding, which may
# differ between two compiled programs (eager ops, jit, vmap): KeyDiff scores the two keys of a row
# of 2 tokens the same (each is as similar as the other to the mean of the two unit keys).
EXACT_TIES = {"keydiff": {2}}


def assert_same_but_ties(name, a, b, lengths):
    """`assert_same`, row by row, except that the rows of `EXACT_TIES` only keep as many entries."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    a, b = jax.device_get((a, b))
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(a)] == [(x.shape, x.dtype) for x in jax.tree.leaves(b)]
    for index, length in enumerate(lengths):
        if length in EXACT_TIES.get(name, ()):
            np.testing.assert_array_equal(a.lengths[index], b.lengths[index])
        else:
            assert_same(jax.tree.map(lambda x: x[index], a), jax.tree.map(lambda x: x[index], b))


@st.composite
def prompts(draw, shape=SHAPE):
    """(lengths, seed): B ragged rows, the longest filling the cache's C slots."""
    batch, capacity, _ = shape
    lengths = draw(st.lists(st.integers(1, capacity), min_size=batch, max_size=batch))
    lengths[draw(st.integers(0, batch - 1))] = capacity
    return lengths, draw(st.integers(0, 2 ** 31 - 1))


def check_budget(name, out, ratio, lengths, capacity, layer_index):
    """Kept counts and the compressed cache's capacity follow the budget."""
    budget = Budget(ratio)
    if name == "pyramidkv":
        def kept(n):
            return layer_budget(n, layer_index, NUM_LAYERS, ratio, WINDOW, 20)
        assert out.capacity == max(kept(n) for n in range(capacity + 1))
    else:
        kept = budget.kept_count
        assert out.capacity == (HKV if is_ragged(out) else 1) * budget.kept_count(capacity)
    counts = np.asarray(out.lengths)
    for b, length in enumerate(lengths):
        if is_ragged(out):  # per-head budgets: the row keeps HKV budgets in all, split by score
            assert counts[b].sum() == HKV * kept(length), (b, counts[b])
            assert ((counts[b] >= 1) & (counts[b] <= length)).all(), (b, counts[b])
        else:
            assert counts[b].tolist() == [kept(length)] * HKV, (b, length, counts[b])


def check_kept_entries(out, layer, lengths):
    """Kept entries are original ones, at their original positions, in their original order."""
    out, layer = jax.tree.map(np.asarray, (out, layer))  # one copy to the host
    for b, length in enumerate(lengths):
        for h in range(HKV):
            positions, keys, values = entries(out, b, h)
            assert ((positions >= 0) & (positions < length)).all(), (b, h, positions)
            assert (np.diff(positions) > 0).all(), (b, h, positions)  # strictly increasing: no duplicates
            np.testing.assert_array_equal(keys, layer.keys[b, h, positions])
            np.testing.assert_array_equal(values, layer.values[b, h, positions])
    # Slots holding no entry say so.
    if is_ragged(out):
        assert (out.positions >= 0).sum() == out.lengths.sum()
    else:
        empty = np.arange(out.positions.shape[-1]) >= out.lengths[..., None]
        assert (out.positions[empty] == -1).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("ratio, layer_index, under_jit_too", CONFIGS)
@settings(max_examples=3, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_kept_entries_follow_the_budget_deterministically_and_under_jit(name, ratio, layer_index, under_jit_too,
                                                                         data):
    lengths, seed = data.draw(prompts())
    layer, chunk = make_inputs(SHAPE, lengths, seed)
    press = make_press(name, ratio)
    out = compress(press, layer_index, layer, chunk)
    check_budget(name, out, ratio, lengths, SHAPE[1], layer_index)
    check_kept_entries(out, layer, lengths)
    assert_same(compress(press, layer_index, layer, chunk), out)  # deterministic
    if under_jit_too:
        compiled = jitted(name, ratio, layer_index)
        assert_same_but_ties(name, compiled(layer, chunk), out, lengths)  # jit == eager
        assert_same(compiled(layer, chunk), compiled(layer, chunk))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=2, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_ratio_zero_is_the_identity(name, data):
    lengths, seed = data.draw(prompts())
    layer, chunk = make_inputs(SHAPE, lengths, seed)
    press = make_press(name, 0.0)
    assert_same(compress(press, 1, layer, chunk), layer)  # same entries, same order, same capacity


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=2, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_vmap_over_stacked_inputs_is_one_by_one(name, data):
    """Batches stacked on a leading axis compress under `jax.vmap` as each batch alone does (both
    jitted: jit == eager is tested above, and the single-batch program is the one compiled there)."""
    ratio, layer_index, _ = CONFIGS[0]
    drawn = [data.draw(prompts()) for _ in range(3)]
    inputs = [make_inputs(SHAPE, lengths, seed) for lengths, seed in drawn]
    stacked = jax.tree.map(lambda *x: np.stack(x), *inputs)
    together = vmapped(name, ratio, layer_index)(*stacked)
    for index, ((layer, chunk), (lengths, _)) in enumerate(zip(inputs, drawn)):
        assert_same_but_ties(name, jax.tree.map(lambda x: x[index], together),
                             jitted(name, ratio, layer_index)(layer, chunk), lengths)
