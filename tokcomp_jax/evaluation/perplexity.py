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


def paired_interval(nll: np.ndarray, reference: np.ndarray, *, level: float = 0.95, draws: int = 10_000,
                    seed: int = 0) -> tuple[float, float, float]:
    """Perplexity ratio exp(mean(nll - reference)) of two methods scored on the same texts, with its
    `level` confidence interval from a paired bootstrap over the texts (Efron & Tibshirani, 1993):
    `nll` and `reference` hold one mean NLL per text, in the same order.

    >>> ratio, low, high = paired_interval(np.array([2.0, 2.5, 3.0]), np.array([2.1, 2.6, 3.1]))
    >>> round(ratio, 4), low < ratio < high or low == high
    (0.9048, True)
    """
    nll, reference = np.asarray(nll, np.float64), np.asarray(reference, np.float64)
    if nll.shape != reference.shape or nll.ndim != 1 or len(nll) < 2:
        raise ValueError(f"nll and reference must be equal-length vectors of at least 2 per-text NLLs, got shapes "
                         f"{nll.shape} and {reference.shape}.")
    difference = nll - reference
    rows = np.random.default_rng(seed).integers(0, len(difference), (draws, len(difference)))
    low, high = np.quantile(difference[rows].mean(axis=1), [(1 - level) / 2, (1 + level) / 2])
    return float(np.exp(difference.mean())), float(np.exp(low)), float(np.exp(high))
