"""TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs", arXiv:2401.06104): the attention
that the last token pays to each entry, averaged over all attention heads, says which entries to
keep; the last token itself is always kept."""
import jax
import jax.numpy as jnp

from tokcomp_jax.presses.base import Budget, Press, press_factory, scorer_press
from tokcomp_jax.presses.scoring import window_mass


def _last_query_attention(layer, obs):
    """Softmax attention `[B, Hkv, C]` of each row's last query over the cache, summed over each KV
    head's query group (rows are end-aligned: every row's last token is the chunk's last); a Pallas
    decode step emits it with its output."""
    if obs.attention.key_probs is not None:
        return obs.attention.key_probs
    return window_mass(layer, obs, 1, jnp.ones(obs.valid[:, -1:].shape, jnp.float32))


def _mean_over_heads(per_kv_head, layer, heads: int):
    """For every entry, the sum over all KV heads of `per_kv_head` at the same token position,
    divided by the number of query heads: each (row, KV head) looks its positions up in the other
    KV heads (sorted, so a binary search), which gives the right average even when the KV heads
    hold different entries (e.g. after a per-head press in a `chain`); a KV head that no longer
    holds the token counts as zero attention."""
    sentinel = jnp.iinfo(jnp.int32).max
    keyed = jnp.where(layer.valid_mask(), layer.positions, sentinel)  # ascending: slots keep token order
    # index[b, k, j, c]: where KV head j holds the token in slot c of KV head k.
    lookup = jax.vmap(jax.vmap(jax.vmap(jnp.searchsorted, (0, None)), (None, 0)), (0, 0))
    index = jnp.minimum(lookup(keyed, keyed), layer.capacity - 1)
    found = jnp.take_along_axis(jnp.broadcast_to(keyed[:, None], index.shape), index, axis=-1) == keyed[:, :, None]
    values = jnp.take_along_axis(jnp.broadcast_to(per_kv_head[:, None], index.shape), index, axis=-1)
    return jnp.sum(jnp.where(found, values, 0.0), axis=2) / heads


@press_factory
def tova(ratio: float | None = None, *, tokens: int | None = None) -> Press:
    """The last query's attention probabilities averaged over all query heads (so KV heads that
    hold the same entries keep the same tokens); the last token is always kept (kvpress
    `TOVAPress`, which gives it the maximum score plus one). The attention ignores a model's
    sliding window, which the `Observation` does not carry.

    >>> from tokcomp_jax.presses.tova import tova
    >>> press = tova(0.5)
    """

    def score(layer, obs, state):
        heads = obs.queries.shape[2]
        scores = _mean_over_heads(_last_query_attention(layer, obs), layer, heads)  # in [0, 1]
        is_last = layer.positions == obs.positions[:, -1][:, None, None]
        return jnp.where(is_last, 2.0, scores)

    return scorer_press(score, Budget(ratio, tokens))
