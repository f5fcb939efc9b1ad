"""The Press API: pure `(init, compress)` pairs over one layer's cache, budgets and selection.

A press sees a layer's `LayerCache` right after that layer's attention has run on a chunk of
tokens, together with an `Observation` of that chunk, and returns a smaller cache. Scorers
(`score(layer, obs) -> [B, Hkv, C]`, higher is kept) are separate from selection (`keep_top`),
so that every scorer gets batched, ragged, memory-saving selection for free.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from tokcomp_jax.cache import LayerCache


class Observation(NamedTuple):
    """What a press may look at for one layer, after the layer's attention ran on a chunk.

    queries / pre_rope_queries: `[B, T, H, D]` the chunk's queries with and without RoPE;
    hidden_states: `[B, T, E]` the attention's input; positions / valid: `[B, T]` each token's
    position and whether it is a real token (rows are aligned to the end: a row's last tokens are
    the chunk's last ones); layer_index; room: cache slots to leave free after compression;
    last_chunk: whether this chunk ends the prompt; inv_freq: `[D / 2]` RoPE frequencies.
    """

    queries: Float[Array, "B T H D"]
    pre_rope_queries: Float[Array, "B T H D"]
    hidden_states: Float[Array, "B T E"]
    positions: Int[Array, "B T"]
    valid: Bool[Array, "B T"]
    layer_index: int
    room: int
    last_chunk: bool
    inv_freq: np.ndarray


class Press(NamedTuple):
    """A compression method, optax-style: `init(layer, layer_index) -> state` and
    `compress(layer, obs, state, **extra) -> (layer, state)`, called on every prefill chunk."""

    init: Callable[[LayerCache, int], Any]
    compress: Callable[..., tuple[LayerCache, Any]]


@dataclasses.dataclass(frozen=True)
class Budget:
    """How many entries a (row, KV head) keeps: `ratio` of them removed, or at most `tokens`."""

    ratio: float | None = None
    tokens: int | None = None

    def __post_init__(self):
        if (self.ratio is None) == (self.tokens is None):
            raise ValueError("give exactly one of ratio (the fraction removed) and tokens (the number kept).")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise ValueError(f"ratio is the fraction of entries removed and must be in [0, 1), got {self.ratio}.")
        if self.tokens is not None and self.tokens < 1:
            raise ValueError(f"tokens is the number of entries kept and must be at least 1, got {self.tokens}.")

    def kept_count(self, length: int) -> int:
        """Entries kept out of `length` (kvpress's `max(1, int(length * (1 - ratio)))`)."""
        if self.tokens is not None:
            return min(self.tokens, length)
        return min(length, max(1, int(length * (1 - self.ratio))))

    def kept(self, lengths: Int[Array, "..."], longest: int) -> Int[Array, "..."]:
        """`kept_count` of every length up to `longest`, exactly as in float64 (a lookup table)."""
        table = np.array([self.kept_count(n) for n in range(longest + 1)], np.int32)
        return jnp.asarray(table)[jnp.clip(lengths, 0, longest)]


def keep_top(layer: LayerCache, scores: Float[Array, "B Hkv C"], n_kept: Int[Array, "B Hkv"],
             capacity: int) -> LayerCache:
    """Keeps each (row, head)'s `n_kept` best-scored valid entries, in their original order, in a
    new cache of `capacity` slots: the memory follows the budget, not the original length."""
    slots = layer.capacity
    scores = jnp.where(layer.valid_mask(), scores.astype(jnp.float32), -jnp.inf)
    k = min(capacity, slots)
    best = jax.lax.top_k(scores, k)[1]  # [B, Hkv, k]
    n_kept = jnp.minimum(n_kept, jnp.minimum(layer.lengths, k))
    best = jnp.where(jnp.arange(k) < n_kept[..., None], best, slots)
    best = jnp.sort(best, axis=-1)  # original order; dropped ranks (== slots) go last
    keep = best < slots
    index = jnp.minimum(best, slots - 1)

    def take(x, fill):
        picked = jnp.take_along_axis(x, index[..., None] if x.ndim == 4 else index, axis=2)
        mask = keep[..., None] if x.ndim == 4 else keep
        picked = jnp.where(mask, picked, fill)
        pad = [(0, 0)] * x.ndim
        pad[2] = (0, capacity - k)
        return jnp.pad(picked, pad, constant_values=fill)

    return LayerCache(keys=take(layer.keys, 0), values=take(layer.values, 0),
                      positions=take(layer.positions, -1), lengths=n_kept.astype(jnp.int32))


Scorer = Callable[[LayerCache, Observation, Any], Float[Array, "B Hkv C"]]


def scorer_press(score: Scorer, budget: Budget, *, init: Callable[[LayerCache, int], Any] = lambda layer, index: None,
                 observe: Callable[[Any, LayerCache, Observation], Any] | None = None) -> Press:
    """A press that scores the entries with `score(layer, obs, state)` once the whole prompt is
    in the cache, and keeps the best within `budget`. `observe(state, layer, obs)` updates the
    state on every chunk (statistics that need all queries, e.g. accumulated attention)."""

    def compress(layer: LayerCache, obs: Observation, state, **extra):
        del extra
        if observe is not None:
            state = observe(state, layer, obs)
        if not obs.last_chunk:
            return layer, state
        longest = layer.capacity - obs.room  # the cache was sized for the prompt plus `room`
        capacity = budget.kept_count(longest) + obs.room
        n_kept = budget.kept(layer.lengths, longest)
        return keep_top(layer, score(layer, obs, state), n_kept, capacity), state

    return Press(init=init, compress=compress)


def press_factory(fn):
    """Caches a press factory on its arguments, so that equal presses are the same object and a
    jitted model compiles once per press configuration."""
    return functools.lru_cache(maxsize=None)(fn)
