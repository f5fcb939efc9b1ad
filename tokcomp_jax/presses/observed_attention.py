"""H2O, the Heavy-Hitter Oracle (Zhang et al., 2023, arXiv:2306.14048): the keys that the prompt's
queries attended to most (the "heavy hitters") are the ones generation needs.

kvpress's `ObservedAttentionPress` reads the whole `S x S` attention matrix of an eager forward
pass. Here no such matrix is ever built: the attention that each prefill chunk's queries pay to
every cache slot (a `[B, Hkv, G, T, C]` tensor, bounded by the chunk size) is added, chunk by
chunk, to a `[B, Hkv, C]` press state, and the entries are scored once the prompt is complete.
"""
from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from tokcomp_jax.attention import attention_mask
from tokcomp_jax.cache import LayerCache
from tokcomp_jax.presses.base import Budget, Observation, Press, press_factory, scorer_press
from tokcomp_jax.presses.scoring import window_mass


class AttentionMass(NamedTuple):
    """What H2O carries across prefill chunks, per cache slot (slots do not move before the last
    chunk's compression).

    mass: the softmax attention paid to the slot's entry, summed over the observed (real) queries
    and over the query heads of its KV head; seen: how many observed queries could see the entry.
    """

    mass: Float[Array, "B Hkv C"]
    seen: Int[Array, "B Hkv C"]


def init_mass(layer: LayerCache, layer_index: int = 0) -> AttentionMass:
    """Nothing observed yet: zeros sized to the layer's cache."""
    del layer_index
    shape = layer.positions.shape
    return AttentionMass(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.int32))


def observe_mass(state: AttentionMass, layer: LayerCache, obs: Observation) -> AttentionMass:
    """Adds the attention of this chunk's real queries (softmax over each query's whole visible
    row: every cache entry at a position <= its own) to `state`."""
    query_valid = obs.valid
    mass = window_mass(layer, obs, obs.queries.shape[1], query_valid.astype(jnp.float32))
    sees = attention_mask(layer, obs.positions) & query_valid[:, None, :, None]  # [B, Hkv, T, C]
    return AttentionMass(state.mass + mass, state.seen + jnp.sum(sees, axis=2, dtype=jnp.int32))


def mass_scores(state: AttentionMass, group: int) -> Float[Array, "B Hkv C"]:
    """Each entry's attention per query that could see it, averaged over the `group` query heads
    of its KV head (kvpress: `attentions.sum(2) / arange(S, 0, -1)`, then the mean over the group).
    An entry no query saw scores 0."""
    return state.mass / (jnp.maximum(state.seen, 1).astype(jnp.float32) * group)


@press_factory
def observed_attention(ratio: float | None = None, *, tokens: int | None = None) -> Press:
    """Keeps the entries with the highest average attention from the prompt's queries (H2O as
    kvpress `ObservedAttentionPress`), accumulated over the prefill chunks so that the selection
    does not depend on the chunk size. Scores are attention probabilities in [0, 1], in float32.

    >>> import tokcomp_jax as tc
    >>> from tokcomp_jax.presses.observed_attention import h2o, observed_attention
    >>> h2o(0.5) is observed_attention(0.5)
    True
    >>> _, cache = tc.prefill(tc.testing.tiny_llama(), [list(range(20))], press=h2o(0.5))
    >>> cache.lengths[0].tolist()
    [[10, 10]]
    """
    def score(layer, obs, state):
        return mass_scores(state, obs.queries.shape[2] // layer.keys.shape[1])

    return scorer_press(score, Budget(ratio, tokens), init=init_mass, observe=observe_mass)


h2o = observed_attention
