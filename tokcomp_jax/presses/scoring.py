"""Statistics that several scorers share, computed with the layer's own attention backend."""
from jaxtyping import Array, Float

from tokcomp_jax.attention import attention_mass
from tokcomp_jax.cache import LayerCache
from tokcomp_jax.compression import Observation


def window_mass(layer: LayerCache, obs: Observation, window_size: int,
                query_weights: Float[Array, "B W"]) -> Float[Array, "B Hkv C"]:
    """`[B, Hkv, C]` the attention (normalised over each query's whole visible row) that the chunk's
    last `window_size` queries pay to each entry, weighted by `query_weights` `[B, W]` and summed
    over the window and each KV head's query group, with the layer's attention backend
    (`tc.attention.attention_mass`; the rows' lse from the layer's own attention is reused)."""
    lse = obs.attention.lse
    return attention_mass(layer, obs.queries[:, -window_size:], obs.positions[:, -window_size:], query_weights,
                          backend=obs.backend, lse=None if lse is None else lse[..., -window_size:])
