"""Random eviction: every entry is equally likely to be kept, the baseline that any scoring method
should beat (kvpress `RandomPress`; used as a baseline in e.g. Devoto et al., 2024,
arXiv:2406.11430, and in the kvpress benchmarks)."""
import jax
import jax.numpy as jnp

from tokcomp_jax.presses.base import Budget, Press, press_factory, scorer_press


def _uniform(key, head, length, position):
    """One uniform draw in [0, 1) for an entry, from `key` folded with its coordinates."""
    for data in (head, length, position):
        key = jax.random.fold_in(key, data)
    return jax.random.uniform(key)


@press_factory
def random(ratio: float | None = None, *, tokens: int | None = None, seed: int = 0) -> Press:
    """Uniform random scores, so the kept entries are a uniformly random subset of the budget's
    size for every (row, layer, KV head) (kvpress `RandomPress` draws `torch.rand` scores).

    Deterministic given `seed`: each entry's score is drawn from `seed` folded with the layer
    index, the KV head, the row's prompt length and the entry's token position, so that layers and
    heads get independent draws, and a row keeps the same entries whether it is alone or in a batch
    of ragged rows (its draws do not depend on its index in the batch nor on the padding). Two rows
    of the same length in one batch therefore keep the same positions. kvpress instead reseeds one
    generator on every layer (so all layers share one draw) and fills `[B, Hkv, S]` in order (so a
    row's draw depends on the batch); its `seed=None` (a fresh draw every call) has no counterpart
    here: pass different seeds.

    >>> from tokcomp_jax.presses.random_press import random
    >>> press = random(0.5, seed=1)
    """
    seed = int(seed)

    def score(layer, obs, state):
        key = jax.random.fold_in(jax.random.key(seed), obs.layer_index)
        shape = layer.positions.shape  # [B, Hkv, C]
        head = jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32)[None, :, None], shape)
        length = jnp.broadcast_to((obs.positions[:, -1] + 1)[:, None, None], shape)  # the row's tokens
        position = jnp.maximum(layer.positions, 0)  # empty slots (-1) are masked by keep_top
        draw = jax.vmap(_uniform, (None, 0, 0, 0))
        return draw(key, head.ravel(), length.ravel(), position.ravel()).reshape(shape)

    return scorer_press(score, Budget(ratio, tokens))
