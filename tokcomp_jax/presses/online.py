"""Compression while the cache fills: after every prefill chunk, so that a long prompt never holds
more than a fixed budget plus one chunk, and every N decoding steps (`tc.generate_ids`'s
`decoding_press`, kvpress `DecodingPress`)."""
from __future__ import annotations

import jax.numpy as jnp

from tokcomp_jax.presses.base import Press, keep_top, press_factory


def fixed_budget(press: Press, what: str) -> int:
    """The number of entries per (row, KV head) that a scoring `press` keeps, which compression
    during prefill or decoding needs as a fixed token budget."""
    if not isinstance(press, Press) or press.scorer is None or press.budget.tokens is None:
        raise ValueError(f"{what} needs a scoring press with a budget in tokens, e.g. tc.presses.knorm(tokens=256).")
    if press.scorer.observe is not None:
        raise ValueError(f"{what} needs a press that scores each cache as it is (knorm, snapkv, tova, keydiff, "
                         f"streaming_llm, ...), not one that accumulates statistics over the prompt.")
    return press.budget.tokens


@press_factory
def chunkwise(press: Press) -> Press:
    """Compresses each layer's cache after every prefill chunk back to `press`'s budget of tokens,
    so that peak cache memory is the budget plus one chunk, whatever the prompt's length.

    Each chunk is scored with the chunk's own observation (its queries: question-agnostic). The
    cache `tc.prefill` allocates holds the budget plus one chunk (or the room asked for, if
    larger); the last chunk's compression leaves the budget plus the room.

    >>> import tokcomp_jax as tc
    >>> press = chunkwise(tc.presses.knorm(tokens=8))
    >>> _, cache = tc.prefill(tc.testing.tiny_llama(), [list(range(40))], press=press, chunk_size=8)
    >>> cache.capacities, cache.lengths[0].tolist()
    ((8, 8), [[8, 8]])
    """
    tokens = fixed_budget(press, "chunkwise")

    def compress(layer, obs, state, **extra):
        if not obs.last_chunk:
            if layer.capacity <= tokens:  # the whole prompt fits in the budget
                return layer, state
            obs = obs._replace(last_chunk=True, room=layer.capacity - tokens)  # same capacity out
        return press.compress(layer, obs, state, **extra)

    return press._replace(compress=compress, bounded=tokens)


@press_factory
def every_n_steps(press: Press, steps: int) -> Press:
    """The press that a decoding step applies every `steps` steps: `press`'s scores on that step's
    observation, keeping its budget of tokens in a cache of the budget plus `steps` slots, so that
    the next `steps` tokens fit (see `tc.generation.generate_ids`'s `decoding_press`)."""
    tokens = fixed_budget(press, "decoding_press")
    if steps < 1:
        raise ValueError(f"compress_every is a number of decoding steps, at least 1; got {steps}.")

    def compress(layer, obs, state, **extra):
        del extra
        scores = press.scorer.score(layer, obs, state)
        return keep_top(layer, scores, jnp.minimum(layer.lengths, tokens), tokens + steps), state

    return Press(init=press.init, compress=compress)
