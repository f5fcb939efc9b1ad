"""Perplexity of long text with the KV cache compressed while it fills (StreamingLLM's language-modelling
evaluation, Xiao et al., 2024, arXiv:2309.17453: a fixed budget of cache entries, the text read in order)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tokcomp_jax.cache import KVCache
from tokcomp_jax.generation import DEFAULT_CHUNK_SIZE, pad_batch, prefill
from tokcomp_jax.presses.base import Press
from tokcomp_jax.presses.online import chunkwise


@dataclasses.dataclass
class Perplexity:
    """Each row's per-token negative log-likelihoods (of tokens 1..n-1 given those before), the cache
    bytes each row held at the end, and the perplexity over all rows' tokens."""

    token_nll: list[np.ndarray]
    cache_bytes: np.ndarray

    @property
    def perplexity(self) -> float:
        return float(np.exp(np.concatenate(self.token_nll).mean()))


@jax.jit
def token_nll(logits, ids):
    """`[B, S-1]` negative log-likelihoods of ids[:, 1:] under logits[:, :-1], in float32."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]


def perplexity(model, ids, *, press: Press | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Perplexity:
    """Teacher-forced negative log-likelihood of `ids` (one list, a list of lists of any lengths, or an
    `[B, S]` array). With `press` (a scoring press with a budget in tokens, e.g.
    `streaming_llm(tokens=256)`), the cache is compressed back to the budget after every chunk of
    `chunk_size` tokens (`tc.presses.chunkwise`), so each token attends to at most budget + chunk
    entries; `chunk_size=1` compresses after every token, as StreamingLLM's evaluation does. The
    logits of every token are computed (`[B, S, V]` floats).

    >>> import tokcomp_jax as tc
    >>> result = perplexity(tc.testing.tiny_llama(), [list(range(40))], press=tc.presses.knorm(tokens=8),
    ...                     chunk_size=8)
    >>> [nll.shape for nll in result.token_nll], result.cache_bytes.tolist()
    ([(39,)], [2176])
    """
    ids, lengths = pad_batch(ids)
    if lengths.min() < 2:
        raise ValueError("perplexity needs rows of at least 2 tokens (the first token is only context).")
    logits, cache = prefill(model, ids, lengths=lengths, press=None if press is None else chunkwise(press),
                            chunk_size=chunk_size, all_logits=True)
    nll = np.asarray(token_nll(logits, jnp.asarray(ids)))
    return Perplexity([row[:n - 1] for row, n in zip(nll, lengths)], cache.entry_nbytes())


def continuation_nll(model, continuation, cache: KVCache | None = None) -> np.ndarray:
    """`[B, m - 1]` negative log-likelihoods of continuation tokens 2..m, each given `cache` (a
    context in whatever form: full, pressed, learned tokens; none: no context) and the continuation
    tokens before it. `cache` needs m free slots.

    >>> import tokcomp_jax as tc
    >>> model = tc.testing.tiny_llama()
    >>> _, cache = tc.prefill(model, [[5, 6, 7, 8]], capacity=7)
    >>> continuation_nll(model, np.array([[9, 10, 11]]), cache).shape
    (1, 2)
    """
    continuation = np.asarray(continuation)
    logits, _ = prefill(model, continuation, cache=cache, all_logits=True)
    return np.asarray(token_nll(logits, jnp.asarray(continuation)))
