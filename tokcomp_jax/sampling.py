"""Next-token selection: greedy, or sampling with temperature, top-k and top-p (nucleus)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """`temperature=0` is greedy; `top_k=0` and `top_p=1` turn those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")


def sample(logits: jnp.ndarray, key: jax.Array, config: SamplingConfig) -> jnp.ndarray:
    """Picks one token per row of `logits` `[B, V]`."""
    if config.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / config.temperature
    neg_inf = jnp.finfo(jnp.float32).min
    if config.top_k:
        kth = jax.lax.top_k(logits, min(config.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if config.top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
        cutoff_index = jnp.sum(cumulative - jax.nn.softmax(sorted_logits, axis=-1) < config.top_p, axis=-1)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index[:, None] - 1, axis=-1)
        logits = jnp.where(logits < cutoff, neg_inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
