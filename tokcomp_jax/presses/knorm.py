"""Knorm (Devoto et al., 2024, arXiv:2406.11430): keys with a low L2 norm draw attention, so keep
the entries whose keys have the smallest norms."""
import jax.numpy as jnp

from tokcomp_jax.presses.base import Budget, Press, press_factory, scorer_press


@press_factory
def knorm(ratio: float | None = None, *, tokens: int | None = None) -> Press:
    """Scores each entry by minus its key norm, in float32 (kvpress `KnormPress`)."""
    return scorer_press(lambda layer, obs, state: -jnp.linalg.norm(layer.keys.astype(jnp.float32), axis=-1),
                        Budget(ratio, tokens))
