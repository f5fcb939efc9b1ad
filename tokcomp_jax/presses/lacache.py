"""LaCache (Shi et al., 2025, "Ladder-Shaped KV Caching for Efficient Long-Context Modeling of Large
Language Models", arXiv:2507.14204): a position-only pattern, no scores. Between the attention sinks
and the recent window, the entries are cut in blocks of `before` tokens of which each layer keeps
`after` consecutive ones, one token later per layer (the ladder: deeper layers keep later tokens,
so that together the layers cover the whole span); "iterative compaction" applies the same ladder
again to what the first pass kept, so the oldest tokens are the most compacted.
"""
import math

import jax.numpy as jnp

from tokcomp_jax.presses.base import Budget, Press, press_factory, scorer_press


def ladder_shape(num_layers: int, span: int, overlap: int) -> tuple[int, int]:
    """(before, after): each block of `before` tokens keeps `after` in every layer (official
    `cache_size_per_ladder_before` and `cache_size_per_ladder_after`)."""
    before = 1 + math.ceil((num_layers - span) / (span - overlap))
    return before, min(math.ceil(span / (span - overlap)), before)


@press_factory
def lacache(ratio: float | None = None, *, tokens: int | None = None, num_layers: int, span: int = 16,
            overlap: int = 0, n_sink: int = 128, window_size: int | None = None) -> Press:
    """LaCache's ladder within a budget (official code, GATECH-EIC/LaCache `LongBench/`: span=16,
    overlap=0, up to 128 sink tokens; the last `num_layers` entries stay whole, as its
    `cache_size - cursor - layer_number`). `num_layers` is the model's (`model.config.num_layers`).

    Every (row, KV head) keeps exactly its budget: the recent window first, then the sinks, then the
    entries that survive the most ladder passes, the most recent first. Where the official code needs
    one pass and keeps as many entries, these are its entries: the ladder from the sinks on, then
    every recent one (it re-rotates the keys to their new slots; here they keep their positions).

    >>> import tokcomp_jax as tc
    >>> from tokcomp_jax.presses.lacache import lacache
    >>> press = lacache(tokens=14, num_layers=2, span=1, n_sink=4, window_size=4)
    >>> _, cache = tc.prefill(tc.testing.tiny_llama(), [list(range(20))], press=press)
    >>> [sorted(layer.positions[0, 0].tolist()) for layer in cache.layers]
    [[0, 1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 17, 18, 19], [0, 1, 2, 3, 5, 7, 9, 11, 13, 15, 16, 17, 18, 19]]
    """
    window_size = num_layers if window_size is None else window_size
    if num_layers < 1 or n_sink < 0 or window_size < 0:
        raise ValueError(f"num_layers must be >= 1 and n_sink, window_size >= 0, got {num_layers}, {n_sink}, "
                         f"{window_size}.")
    before, after = ladder_shape(num_layers, span, overlap) if 0 <= overlap < span else (1, 1)
    if before <= after:
        raise ValueError(f"the ladder needs 0 <= overlap < span < num_layers (so that a layer drops part of "
                         f"each block), got span={span}, overlap={overlap}, num_layers={num_layers}.")

    def score(layer, obs, state):
        if not 0 <= obs.layer_index < num_layers:
            raise ValueError(f"lacache was made for num_layers={num_layers} but layer {obs.layer_index} came.")
        offset = obs.layer_index % (before - after + 1)  # the ladder: one token later per layer
        capacity = layer.capacity
        passes = math.ceil(math.log(max(capacity, 2)) / math.log(before / after))  # until <= 1 entry is left
        slot = jnp.arange(capacity)
        # Slots, not positions (as the official code): `rank` is an entry's index in the list that
        # the previous pass kept (blocks start after the sinks), `level` the passes it survives.
        rank = jnp.broadcast_to(slot - n_sink, layer.positions.shape)
        level = jnp.zeros_like(rank)
        alive = rank >= 0
        for _ in range(passes):
            phase = rank % before - offset
            alive &= (phase >= 0) & (phase < after)
            rank = (rank // before) * after + phase
            level += alive
        # Integer scores, exact in float32 below 2 ** 24: window > sinks > level, then recency.
        scores = level * capacity + slot
        scores = jnp.where(slot < n_sink, (passes + 2) * capacity - slot, scores)
        scores = jnp.where(slot >= layer.lengths[..., None] - window_size, (passes + 3) * capacity + slot, scores)
        return scores.astype(jnp.float32)

    return scorer_press(score, Budget(ratio, tokens))
