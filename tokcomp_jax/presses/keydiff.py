"""KeyDiff (Park et al., 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context
LLM Inference in Resource-Constrained Environments", arXiv:2504.15364): keys that differ most from
the average key direction are the informative ones, so evict the keys most similar to it."""
import jax.numpy as jnp

from tokcomp_jax.presses.base import Budget, Press, press_factory, scorer_press


@press_factory
def keydiff(ratio: float | None = None, *, tokens: int | None = None) -> Press:
    """Scores each entry by minus the cosine similarity of its key to the anchor, the mean of the
    (row, KV head)'s L2-normalised keys, in float32 (kvpress `KeyDiffPress`: one-shot scoring of
    the whole prompt; the paper's block-wise eviction is kvpress's `BlockPress` around it).

    >>> from tokcomp_jax.presses.keydiff import keydiff
    >>> press = keydiff(0.5)
    """

    def score(layer, obs, state):
        keys = layer.keys.astype(jnp.float32)
        valid = layer.valid_mask()[..., None]
        norms = jnp.linalg.norm(keys, axis=-1, keepdims=True)  # [B, Hkv, C, 1]
        unit = keys / jnp.maximum(norms, 1e-12)  # torch F.normalize
        count = jnp.maximum(layer.lengths, 1)[..., None, None].astype(jnp.float32)
        anchor = jnp.sum(jnp.where(valid, unit, 0.0), axis=2, keepdims=True) / count  # [B, Hkv, 1, D]
        anchor_norm = jnp.linalg.norm(anchor, axis=-1, keepdims=True)
        # torch F.cosine_similarity (eps=1e-8): each vector divided by its norm clamped at eps.
        cosine = jnp.sum(keys / jnp.maximum(norms, 1e-8) * (anchor / jnp.maximum(anchor_norm, 1e-8)), axis=-1)
        return -cosine

    return scorer_press(score, Budget(ratio, tokens))
