"""Q-Filters (Godey et al., 2025, "Q-Filters: Leveraging QK Geometry for Efficient KV Cache
Compression", arXiv:2503.02812): the queries of a head share one dominant direction, the same
whatever the context, so a key's projection on it estimates the attention it will draw; keep the
keys that project most on it.

The direction of a query head is the first right singular vector of its queries on calibration
text, oriented so that the queries project positively on it. The authors' script
(github.com/NathanGodey/qfilters, `make_filters.py`) takes the post-RoPE queries, which are what
meets the cached (post-RoPE) keys, computes one vector per query head, averages them over the query
heads that share a KV head, and stores the negated vector, so that the *lowest* projections are
kept; its published filters, which kvpress's `QFilterPress` downloads, follow that convention and
layout `[layers, KV heads, head_dim]`, as do the filters here (published ones can be used as is).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Float

from tokcomp_jax.batching import DEFAULT_CHUNK_SIZE, check_token_ids, pad_batch
from tokcomp_jax.compression import CompressibleModel, init_states
from tokcomp_jax.presses.base import Budget, Press, press_factory, scorer_press


@dataclasses.dataclass(frozen=True)
class _Filters:
    """Filters as hashable float32 bytes, so that `press_factory` caches presses by their value."""

    shape: tuple[int, int, int]
    data: bytes

    @property
    def array(self) -> np.ndarray:
        return np.frombuffer(self.data, np.float32).reshape(self.shape)


def qfilter(ratio: float | None = None, *, tokens: int | None = None, filters) -> Press:
    """Scores each entry by minus its key's projection on its layer's and KV head's filter, in
    float32 (kvpress `QFilterPress`). `filters` is an array `[layers, KV heads, head_dim]` in the
    authors' convention (see the module docstring), e.g. from `calibrate_qfilters`; presses built
    from equal filters are the same object (one compilation). Filters that do not fit a layer's
    KV heads and head_dim, or that have too few layers, raise a ValueError when the press runs
    (too many layers cannot be told apart: a press does not see the model's depth).

    >>> import tokcomp_jax as tc
    >>> from tokcomp_jax.presses.qfilter import calibrate_qfilters, qfilter
    >>> model = tc.testing.tiny_llama()
    >>> filters = calibrate_qfilters(model, [list(range(64))])
    >>> filters.shape
    (2, 2, 8)
    >>> _, cache = tc.prefill(model, [[5, 3, 8, 1, 9, 2]], press=qfilter(0.5, filters=filters))
    >>> cache.lengths[:, 0].tolist()  # [layers, KV heads] kept of the row's 6
    [[3, 3], [3, 3]]
    """
    array = np.array(filters, np.float32)  # a copy: later changes to `filters` do not reach the press
    if array.ndim != 3:
        raise ValueError(f"filters must be shaped [num_layers, num_kv_heads, head_dim], got shape {array.shape}; "
                         "compute them with calibrate_qfilters(model, ids).")
    if not np.isfinite(array).all():
        raise ValueError("filters holds NaN or infinite values.")
    return _qfilter(ratio, tokens, _Filters(array.shape, array.tobytes()))


@press_factory
def _qfilter(ratio: float | None, tokens: int | None, filters: _Filters) -> Press:
    array = filters.array

    def score(layer, obs, state):
        _, kv_heads, _, dim = layer.keys.shape
        if obs.layer_index >= array.shape[0] or array.shape[1:] != (kv_heads, dim):
            raise ValueError(
                f"filters is shaped {array.shape} ([layers, KV heads, head_dim]) but layer {obs.layer_index} "
                f"of the model has {kv_heads} KV heads "
                f"of dimension {dim}; compute filters for this model with calibrate_qfilters(model, ids).")
        return -jnp.einsum("bhcd,hd->bhc", layer.keys.astype(jnp.float32), array[obs.layer_index],
                           precision=jax.lax.Precision.HIGHEST)

    return scorer_press(score, Budget(ratio, tokens))


@press_factory
def _query_moments(num_heads: int) -> Press:
    """A press that leaves the cache unchanged and sums, per query head, the valid tokens'
    post-RoPE queries `[H, D]` and their outer products `[H, D, D]` (Q^T Q), in float32."""

    def init(layer, layer_index):
        dim = layer.keys.shape[-1]
        return jnp.zeros((num_heads, dim), jnp.float32), jnp.zeros((num_heads, dim, dim), jnp.float32)

    def compress(layer, obs, state, **extra):
        sums, moments = state
        queries = jnp.where(obs.valid[:, :, None, None], obs.queries.astype(jnp.float32), 0.0)
        moments = moments + jnp.einsum("bthd,bthe->hde", queries, queries, precision=jax.lax.Precision.HIGHEST)
        return layer, (sums + queries.sum(axis=(0, 1)), moments)

    return Press(init=init, compress=compress)


@functools.partial(nnx.jit, static_argnames="press", donate_argnames="cache")
def _observe_chunk(model: CompressibleModel, ids, cache, valid, press: Press, states):
    """One chunk through the model, for `press` to observe; the logits are not computed."""
    _, cache, states = model(ids, cache, valid, all_logits=False, press=press, press_states=states)
    return cache, states


def calibrate_qfilters(model: CompressibleModel, ids, *,
                       chunk_size: int = DEFAULT_CHUNK_SIZE) -> Float[np.ndarray, "L Hkv D"]:
    """Q-Filters `[layers, KV heads, head_dim]` estimated from the model's queries on calibration
    `ids` (one list, a list of lists of any lengths, or an `[B, S]` array), run in chunks of
    `chunk_size` tokens.

    Per layer and query head, the first right singular vector `v` of the post-RoPE queries `Q`
    `[N, D]` is the top eigenvector of `Q^T Q`, accumulated chunk by chunk (memory independent of
    the calibration length). Its sign is chosen so that the queries project positively on average
    (`sum(Q) . v > 0`; the authors' script takes the sign that most
    queries agree with, the same on the anisotropic heads the method relies on: on SmolLM2-135M at
    least 98.5% of every head's queries fall on one side). The filter is `-v` averaged over each KV
    head's query group, as the authors compute theirs (they calibrate on about 20 sequences of
    2,048 tokens of web text).

    >>> import tokcomp_jax as tc
    >>> from tokcomp_jax.presses.qfilter import calibrate_qfilters
    >>> calibrate_qfilters(tc.testing.tiny_llama(), [list(range(64))]).shape
    (2, 2, 8)
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}.")
    ids, lengths = pad_batch(ids)
    check_token_ids(ids, model.config.vocab_size)
    batch, steps = ids.shape
    chunk = min(chunk_size, steps)
    width = -(-steps // chunk) * chunk
    ids = np.pad(ids, ((0, 0), (0, width - steps)))
    valid = np.arange(width) < lengths[:, None]  # right padding: padded tokens are not cached nor counted
    cache = model.init_cache(batch, width)
    press = _query_moments(model.config.num_heads)
    stats = init_states(press, cache)
    for start in range(0, width, chunk):
        cache, stats = _observe_chunk(model, ids[:, start:start + chunk], cache, valid[:, start:start + chunk],
                                      press, stats)
    sums = np.stack([np.asarray(s, np.float64) for s, _ in stats])  # [L, H, D]
    moments = np.stack([np.asarray(m, np.float64) for _, m in stats])  # [L, H, D, D]
    first = np.linalg.eigh(moments)[1][..., -1]  # eigenvalues ascend: the last column is the top one
    first = np.where((np.sum(first * sums, axis=-1) < 0)[..., None], -first, first)
    num_layers, num_heads, dim = sums.shape
    kv_heads = cache.layers[0].lengths.shape[1]
    return (-first).reshape(num_layers, kv_heads, num_heads // kv_heads, dim).mean(axis=2).astype(np.float32)
