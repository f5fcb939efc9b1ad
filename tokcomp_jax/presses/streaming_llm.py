"""StreamingLLM (Xiao et al., 2024, arXiv:2309.17453): keep the first `n_sink` tokens and the
most recent ones."""
import jax.numpy as jnp

from tokcomp_jax.presses.base import Budget, Press, press_factory, prompt_slots, scorer_press


@press_factory
def streaming_llm(ratio: float | None = None, *, tokens: int | None = None, n_sink: int = 4) -> Press:
    """Attention sinks plus a recent window (kvpress `StreamingLLMPress`, n_sink=4).

    >>> import tokcomp_jax as tc
    >>> press = tc.presses.streaming_llm(0.5)
    """
    if n_sink < 0:
        raise ValueError(f"n_sink must be >= 0, got {n_sink}.")
    budget = Budget(ratio, tokens)

    def score(layer, obs, state):
        n_pruned = layer.lengths - budget.kept(layer.lengths, prompt_slots(layer, obs))  # [B, Hkv]
        # Slots, not positions (as kvpress): the oldest entries still cached are the sinks.
        slot = jnp.arange(layer.capacity)
        keep = (slot < n_sink) | (slot >= n_sink + n_pruned[..., None])
        return keep.astype(jnp.float32)

    return scorer_press(score, budget)
