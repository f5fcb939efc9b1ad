"""The Press API: pure `(init, compress)` pairs over one layer's cache, budgets and selection.

A press is a `tc.compression.LayerCompressor`: it sees a layer's `LayerCache` right after that
layer's attention has run on a chunk of tokens, together with an `Observation` of that chunk, and
returns a smaller cache. Scorers
(`score(layer, obs) -> [B, Hkv, C]`, higher is kept) are separate from selection (`keep_top`),
so that every scorer gets batched, ragged, memory-saving selection for free.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from tokcomp_jax.cache import LayerCache, RaggedLayerCache
from tokcomp_jax.compression import Observation

Scores = Float[Array, "B Hkv C"]


class Scorer(NamedTuple):
    """How a scoring press rates the entries: `score(layer, obs, state)` (higher is kept) once the
    prompt is complete, and `observe(state, layer, obs)` (or None) on every chunk before that."""

    score: Callable[[LayerCache, Observation, Any], Scores]
    observe: Callable[[Any, LayerCache, Observation], Any] | None = None


class Press(NamedTuple):
    """A compression method, optax-style: `init(layer, layer_index) -> state` and
    `compress(layer, obs, state, **extra) -> (layer, state)`, called on every prefill chunk.

    A press that scores entries and keeps the best within a budget also exposes its `scorer` and
    `budget`, so that other selectors (e.g. AdaKV's per-head budgets) can wrap it. `bounded` is
    the most entries per (row, KV head) a press that compresses after every prefill chunk keeps
    (None: it compresses once the prompt is complete), for `tc.prefill` to size the cache."""

    init: Callable[[LayerCache, int], Any]
    compress: Callable[..., tuple[LayerCache, Any]]
    scorer: Scorer | None = None
    budget: "Budget | None" = None
    bounded: int | None = None


@dataclasses.dataclass(frozen=True)
class Budget:
    """How many entries a (row, KV head) keeps: `ratio` of them removed, or at most `tokens`."""

    ratio: float | None = None
    tokens: int | None = None

    def __post_init__(self):
        if (self.ratio is None) == (self.tokens is None):
            raise ValueError("give exactly one of ratio (the fraction removed) and tokens (the number kept).")
        if self.ratio is not None and (isinstance(self.ratio, bool) or not isinstance(self.ratio, numbers.Real)):
            raise ValueError(f"ratio is the fraction of entries removed, a number in [0, 1); got {self.ratio!r}.")
        if self.tokens is not None and (isinstance(self.tokens, bool) or not isinstance(self.tokens, numbers.Integral)):
            raise ValueError(f"tokens is the number of entries kept, a whole number >= 1; got {self.tokens!r}.")
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
        return per_length([self.kept_count(n) for n in range(longest + 1)], lengths)


def per_length(table: list[int], lengths: Int[Array, "..."]) -> Int[Array, "..."]:
    """`table[length]` for each of `lengths` (clipped to the table): budgets computed on the host,
    in float64, for every length a row may have."""
    return jnp.asarray(np.array(table, np.int32))[jnp.clip(lengths, 0, len(table) - 1)]


def prompt_slots(layer: LayerCache, obs: Observation) -> int:
    """The most entries a row holds once the prompt is in: the cache was sized for the prompt plus
    the `obs.room` slots asked to stay free after compression."""
    return layer.capacity - obs.room


def require_uniform(layer) -> None:
    """Raises for a cache with per-head budgets, which presses that select per head cannot take."""
    if isinstance(layer, RaggedLayerCache):
        raise ValueError("this layer's cache already holds a budget per KV head (AdaKV); apply adakv last, "
                         "after every other press, and only once.")


def ranked_scores(layer: LayerCache, scores: Scores) -> Scores:
    """Scores in float32 ready for top-k: empty slots at -inf, NaN scores just above them (an entry
    scored NaN, e.g. from a NaN key, is dropped before every entry with a real score)."""
    scores = scores.astype(jnp.float32)
    scores = jnp.where(jnp.isnan(scores), jnp.finfo(jnp.float32).min, scores)
    return jnp.where(layer.valid_mask(), scores, -jnp.inf)


def keep_top(layer: LayerCache, scores: Scores, n_kept: Int[Array, "B Hkv"], capacity: int) -> LayerCache:
    """Keeps each (row, head)'s `n_kept` best-scored valid entries, in their original order, in a
    new cache of `capacity` slots: the memory follows the budget, not the original length."""
    require_uniform(layer)
    slots = layer.capacity
    scores = ranked_scores(layer, scores)
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


def no_state(layer: LayerCache, layer_index: int) -> None:
    """The `init` of a press that carries nothing across chunks."""
    del layer, layer_index


def scorer_press(score: Callable[[LayerCache, Observation, Any], Scores], budget: Budget, *,
                 init: Callable[[LayerCache, int], Any] = no_state,
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
        longest = prompt_slots(layer, obs)
        capacity = budget.kept_count(longest) + obs.room
        n_kept = budget.kept(layer.lengths, longest)
        return keep_top(layer, score(layer, obs, state), n_kept, capacity), state

    return Press(init=init, compress=compress, scorer=Scorer(score, observe), budget=budget)


def press_factory(fn):
    """Caches a press factory on its arguments, so that equal presses are the same object and a
    jitted model compiles once per press configuration."""
    return functools.lru_cache(maxsize=None)(fn)
