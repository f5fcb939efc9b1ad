"""AdaKV (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation",
arXiv:2407.11550): the budget of a layer is shared by its KV heads, each keeping as many entries as
its scores earn against the other heads', with a safeguard share that every head keeps.

kvpress's `AdaKVPress` masks the evicted keys and keeps them in memory. Here each head keeps only
its entries, in a `RaggedLayerCache` whose pool holds the layer's budget: the memory follows the
budget whatever its split between the heads.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool

from tokcomp_jax.cache import LayerCache, RaggedLayerCache
from tokcomp_jax.presses.base import (Press, per_length, press_factory, prompt_slots, ranked_scores,
                                      require_uniform)


def pack_ragged(layer: LayerCache, keep: Bool[Array, "B Hkv C"], room: int, capacity: int) -> RaggedLayerCache:
    """The entries marked in `keep`, in token order, head after head in a pool of `capacity` slots
    per row; each head's segment holds its entries plus `room` free slots."""
    counts = jnp.sum(keep, axis=-1, dtype=jnp.int32)  # [B, Hkv]
    segments = counts + room
    starts = jnp.cumsum(segments, axis=1, dtype=jnp.int32) - segments
    slots = starts[..., None] + jnp.cumsum(keep, axis=-1, dtype=jnp.int32) - 1
    index = (jnp.arange(keep.shape[0])[:, None, None], jnp.where(keep, slots, capacity))
    batch, _, _, dim = layer.keys.shape

    def pool(x, fill, shape):
        return jnp.full(shape, fill, x.dtype).at[index].set(x, mode="drop")

    return RaggedLayerCache(keys=pool(layer.keys, 0, (batch, capacity, dim)),
                            values=pool(layer.values, 0, (batch, capacity, dim)),
                            positions=pool(layer.positions, -1, (batch, capacity)), starts=starts, lengths=counts)


@press_factory
def adakv(press: Press, *, alpha_safeguard: float = 0.20) -> Press:
    """Head-wise adaptive budgets over `press`'s scores (kvpress `AdaKVPress`, alpha_safeguard=0.2):
    each row keeps (number of KV heads) x (`press`'s per-head budget) entries per layer, the best
    scored over all its heads, each head keeping at least its `alpha_safeguard` share of a budget
    (its best `int(budget * alpha_safeguard)` entries, at least one).

    `press` must be a scoring press (knorm, snapkv, tova, ...). The compressed layers are
    `RaggedLayerCache`s, so adakv comes last in a `chain`.

    >>> import tokcomp_jax as tc
    >>> _, cache = tc.prefill(tc.testing.tiny_llama(), [list(range(20))], press=adakv(tc.presses.knorm(0.5)))
    >>> int(cache.lengths[0].sum())  # 2 KV heads x 10 entries, split between them by score
    20
    """
    if not isinstance(press, Press) or press.scorer is None:
        raise ValueError("adakv wraps a scoring press with a budget, e.g. adakv(tc.presses.snapkv(0.5)).")
    if not 0 <= alpha_safeguard <= 1:
        raise ValueError(f"alpha_safeguard is the share of a head's budget it always keeps, in [0, 1]; "
                         f"got {alpha_safeguard}.")
    scorer, budget = press.scorer, press.budget

    def n_safe(n_kept: int) -> int:
        safe = int(n_kept * alpha_safeguard)
        return max(1, safe) if alpha_safeguard > 0 and n_kept > 0 else safe

    def compress(layer, obs, state, **extra):
        del extra
        require_uniform(layer)
        if scorer.observe is not None:
            state = scorer.observe(state, layer, obs)
        if not obs.last_chunk or budget.ratio == 0:
            return layer, state
        batch, kv_heads, slots = layer.positions.shape
        kept_table = [budget.kept_count(n) for n in range(prompt_slots(layer, obs) + 1)]
        lengths = layer.lengths[:, 0]  # before compression every head holds the row's tokens
        n_kept = per_length(kept_table, lengths)  # [B] per head
        safe = per_length([n_safe(k) for k in kept_table], lengths)
        scores = ranked_scores(layer, scorer.score(layer, obs, state))
        # The safeguard: each head's best `safe` entries outrank every other entry.
        most_safe = max(n_safe(k) for k in kept_table)
        if most_safe:
            best = jax.lax.top_k(scores, most_safe)[1]
            forced = jnp.arange(most_safe) < safe[:, None, None]
            rows, heads = jnp.arange(batch)[:, None, None], jnp.arange(kv_heads)[None, :, None]
            scores = scores.at[rows, heads, jnp.where(forced, best, slots)].set(jnp.inf, mode="drop")
        # The layer's budget, to the best entries over all its heads.
        most_kept = kv_heads * max(kept_table)
        flat = scores.reshape(batch, kv_heads * slots)
        best = jax.lax.top_k(flat, most_kept)[1]
        chosen = jnp.arange(most_kept) < (kv_heads * n_kept)[:, None]
        keep = jnp.zeros(flat.shape, bool).at[jnp.arange(batch)[:, None], jnp.where(chosen, best, flat.shape[1])].set(
            True, mode="drop")
        keep = keep.reshape(batch, kv_heads, slots) & layer.valid_mask()
        return pack_ragged(layer, keep, obs.room, kv_heads * (max(kept_table) + obs.room)), state

    return Press(init=press.init, compress=compress)
