"""A2SF (Jo & Shin, 2024, "Accumulative Attention Scoring with Forgetting Factor for Token Pruning
in Transformer Decoder", arXiv:2407.20485): H2O's accumulated attention favours old tokens, which
more queries could see; A2SF multiplies every earlier query's attention by a forgetting factor
`alpha` per later token, `score[k] = sum_q alpha ** (last - q) * attention[q, k]`.

As for H2O, no `S x S` matrix is built: each prefill chunk decays the `[B, Hkv, C]` state by
`alpha ** (its real tokens)` and adds its own queries' attention, each weighted by `alpha ** (the
real tokens after it in the chunk)`, so the scores do not depend on the chunk size.
"""
import jax.numpy as jnp
from jaxtyping import Array, Float

from tokcomp_jax.cache import LayerCache
from tokcomp_jax.presses.base import Budget, Observation, Press, press_factory, scorer_press
from tokcomp_jax.presses.scoring import window_mass


def init_scores(layer: LayerCache, layer_index: int = 0) -> Float[Array, "B Hkv C"]:
    """Nothing observed yet: zeros sized to the layer's cache."""
    del layer_index
    return jnp.zeros(layer.positions.shape, jnp.float32)


def observe_scores(state: Float[Array, "B Hkv C"], layer: LayerCache, obs: Observation,
                   forgetting_factor: float) -> Float[Array, "B Hkv C"]:
    """Decays `state` by `alpha ** n` (n: the chunk's real tokens, per row) and adds the attention
    of the chunk's real queries, summed over each KV head's query group (as the official code),
    the query followed by m real tokens weighted by `alpha ** m`."""
    valid = obs.valid
    real = jnp.sum(valid, axis=1, dtype=jnp.int32)  # [B]
    after = real[:, None] - jnp.cumsum(valid, axis=1, dtype=jnp.int32)  # real tokens after each query
    weights = jnp.where(valid, forgetting_factor ** after.astype(jnp.float32), 0.0)  # [B, T]
    decay = forgetting_factor ** real.astype(jnp.float32)
    return state * decay[:, None, None] + window_mass(layer, obs, obs.queries.shape[1], weights)


@press_factory
def a2sf(ratio: float | None = None, *, tokens: int | None = None, forgetting_factor: float = 0.95,
         window_size: int = 16) -> Press:
    """Keeps the last `window_size` entries and the entries with the highest accumulated attention
    with forgetting (official code: forgetting_factor 0.95 in its README example, a recent window of
    16 entries always kept; forgetting_factor=1 is H2O's unnormalised accumulated attention).

    >>> import tokcomp_jax as tc
    >>> from tokcomp_jax.presses.a2sf import a2sf
    >>> _, cache = tc.prefill(tc.testing.tiny_llama(), [list(range(40))], press=a2sf(0.5))
    >>> cache.lengths[0].tolist()
    [[20, 20]]
    """
    if not 0 < forgetting_factor <= 1:
        raise ValueError(f"forgetting_factor must be in (0, 1] (1 is H2O's accumulated attention), "
                         f"got {forgetting_factor}.")
    if window_size < 0:
        raise ValueError(f"window_size (recent entries always kept) must be >= 0, got {window_size}.")

    def observe(state, layer, obs):
        return observe_scores(state, layer, obs, forgetting_factor)

    def score(layer, obs, state):
        slot = jnp.arange(layer.capacity)
        recent = slot >= layer.lengths[..., None] - window_size  # [B, Hkv, C]
        # Above every attention score, the most recent first (if the budget is below the window).
        return jnp.where(recent, jnp.max(state) + 1.0 + slot, state)

    return scorer_press(score, Budget(ratio, tokens), init=init_scores, observe=observe)
