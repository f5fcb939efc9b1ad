"""Attention of new queries over a layer's KV cache: one entry point, backends registered by name.

A backend (`AttentionBackend`) computes a chunk's attention over the cache and each entry's
attention mass for the presses' scorers. Models pick one by name (`attn_impl`) and call
`attention`; scorers receive it in their `Observation`. Registered here: "xla" (the default:
`blockwise_attention` over a uniform cache, block by block over the slots the queries can see; the
dense `attend` is its reference and serves ragged caches, decoding and caches of one block) and
"pallas" (`pallas_kernels`: a split-K decode kernel over the compressed cache, a flash prefill
kernel that also returns each query's log-sum-exp, and a per-key attention-mass kernel; interpreted
on CPU). Both see the same entries:
valid slots at token positions at or before the query's. A request a backend cannot serve raises,
naming the backend and what it lacks; nothing falls back to another backend.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels.common import uniform_starts
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.prefill_attention import prefill_attention
from pallas_kernels.window_scores import window_scores
from tokcomp_jax.blockwise_attention import DEFAULT_BLOCK_SIZE, blockwise_attend
from tokcomp_jax.cache import LayerCache, RaggedLayerCache

class AttentionStats(NamedTuple):
    """What an attention kernel computed on the side, for the presses: lse `[B, H, T]` the
    log-sum-exp of each query's row (Pallas prefill), key_probs `[B, Hkv, C]` the attention
    probability of each entry summed over its query group (Pallas decode, when asked for)."""

    lse: Float[Array, "B H T"] | None = None
    key_probs: Float[Array, "B Hkv C"] | None = None


def attention_mask(layer: LayerCache | RaggedLayerCache, query_positions: Int[Array, "B T"],
                   sliding_window: int | None = None) -> Bool[Array, "B Hkv T C"]:
    """Which cache slots each query may see: valid entries at positions <= the query's own."""
    key_positions = layer.head_positions()[:, :, None, :]
    query_positions = query_positions[:, None, :, None]
    mask = layer.valid_mask()[:, :, None, :] & (key_positions <= query_positions)
    if sliding_window is not None:
        mask &= key_positions > query_positions - sliding_window
    return mask


def attention_probs(layer: LayerCache | RaggedLayerCache, queries: Float[Array, "B T H D"],
                    query_positions: Int[Array, "B T"], sliding_window: int | None = None,
                    extra_mask: Bool[Array, "B T C"] | None = None) -> Float[Array, "B Hkv G T C"]:
    """Softmax attention of `queries` over the cache in float32, GQA query heads grouped on their
    KV head (zeros for a query that sees no key). `extra_mask` hides more slots (e.g. gist masking)."""
    batch, steps, heads, dim = queries.shape
    kv_heads = layer.lengths.shape[1]
    kv = "bcd" if isinstance(layer, RaggedLayerCache) else "bkcd"
    grouped = queries.reshape(batch, steps, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum(f"btkgd,{kv}->bkgtc", grouped, layer.keys,
                        preferred_element_type=jnp.float32) * dim ** -0.5
    mask = attention_mask(layer, query_positions, sliding_window)
    if extra_mask is not None:
        mask &= extra_mask[:, None]
    mask = mask[:, :, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)


def attend(queries: Float[Array, "B T H D"], layer: LayerCache | RaggedLayerCache,
           query_positions: Int[Array, "B T"], *, sliding_window: int | None = None,
           extra_mask: Bool[Array, "B T C"] | None = None) -> Float[Array, "B T H D"]:
    """Softmax attention of `queries` over the cache (the XLA reference).

    Scores and softmax run in float32; a query that sees no key gets zeros. A ragged cache's pool
    is shared by the KV heads, each masked to its own segment. `extra_mask` `[B, T, C]` hides
    more slots from each query.
    """
    batch, steps, heads, dim = queries.shape
    probs = attention_probs(layer, queries, query_positions, sliding_window, extra_mask)
    kv = "bcd" if isinstance(layer, RaggedLayerCache) else "bkcd"
    out = jnp.einsum(f"bkgtc,{kv}->btkgd", probs.astype(layer.values.dtype), layer.values)
    return out.reshape(batch, steps, heads, dim)


def cache_pool(layer: LayerCache | RaggedLayerCache):
    """The cache as the kernels read it: keys, values `[B, N, D]`, positions `[B, N]`, starts and
    lengths `[B, Hkv]` (a uniform cache's heads one after another; lengths clipped to the slots)
    and the kernels' `max_segment` (a uniform cache's capacity, None for a ragged one)."""
    if isinstance(layer, RaggedLayerCache):
        lengths = jnp.minimum(layer.lengths, layer.segment_ends() - layer.starts)
        return layer.keys, layer.values, layer.positions, layer.starts, lengths, None
    batch, kv_heads, capacity, dim = layer.keys.shape
    return (layer.keys.reshape(batch, kv_heads * capacity, dim), layer.values.reshape(batch, kv_heads * capacity, dim),
            layer.positions.reshape(batch, kv_heads * capacity), uniform_starts(batch, kv_heads, capacity),
            jnp.minimum(layer.lengths, capacity), capacity)


def head_view(layer: LayerCache | RaggedLayerCache, per_slot: Float[Array, "B N"]) -> Float[Array, "B Hkv C"]:
    """A per-slot statistic of the pool, seen per KV head like `layer.head_positions()`."""
    if isinstance(layer, RaggedLayerCache):
        return jnp.where(layer.valid_mask(), per_slot[:, None, :], 0.0)
    return per_slot.reshape(layer.positions.shape)


def pallas_attend(queries: Float[Array, "B T H D"], layer: LayerCache | RaggedLayerCache,
                  query_positions: Int[Array, "B T"], *,
                  key_probs: bool = False) -> tuple[Float[Array, "B T H D"], AttentionStats]:
    """`attend` with the Pallas kernels, and what they give on the side: one query per row runs the
    decode kernel (every entry is at or before the newest token), emitting each entry's attention
    probability when `key_probs`; a chunk runs the prefill kernel, which returns the rows' lse."""
    keys, values, positions, starts, lengths, max_segment = cache_pool(layer)
    if queries.shape[1] == 1:
        result = decode_attention(queries[:, 0], keys, values, starts, lengths, return_probs=key_probs,
                                  max_segment=max_segment)
        out, probs = result if key_probs else (result, None)
        return out[:, None], AttentionStats(key_probs=None if probs is None else head_view(layer, probs))
    out, lse = prefill_attention(queries, keys, values, starts, lengths, positions, query_positions,
                                 max_segment=max_segment)
    return out, AttentionStats(lse=lse)


def xla_attention_mass(layer: LayerCache | RaggedLayerCache, queries: Float[Array, "B W H D"],
                       query_positions: Int[Array, "B W"], query_weights: Float[Array, "B W"],
                       lse: Float[Array, "B H W"] | None = None) -> Float[Array, "B Hkv C"]:
    """`attention_mass` from the `[W, C]` attention probabilities (the reference; `lse` unused)."""
    del lse
    probs = attention_probs(layer, queries, query_positions)
    return jnp.einsum("bkgwc,bw->bkc", probs, query_weights.astype(jnp.float32))


def pallas_attention_mass(layer: LayerCache | RaggedLayerCache, queries: Float[Array, "B W H D"],
                          query_positions: Int[Array, "B W"], query_weights: Float[Array, "B W"],
                          lse: Float[Array, "B H W"] | None = None) -> Float[Array, "B Hkv C"]:
    """`attention_mass` without a `[W, C]` matrix (`pallas_kernels.window_scores`; `lse` may come
    from the layer's own attention)."""
    keys, values, positions, starts, lengths, max_segment = cache_pool(layer)
    mass = window_scores(queries, keys, values, starts, lengths, positions, query_positions,
                         query_weights.astype(jnp.float32), lse=lse, max_segment=max_segment)
    return head_view(layer, mass)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def blockwise_forward_dense_backward(sliding_window, queries, keys, values, positions, lengths, query_positions,
                                     extra_mask):
    """`blockwise_attend` forward; differentiated, it keeps only its inputs and the backward pass is
    `attend`'s, recomputed layer by layer (a scan's backward would hold every block's scores at once,
    and more of them than the dense scores under per-layer rematerialisation)."""
    return blockwise_attend(queries, LayerCache(keys, values, positions, lengths), query_positions,
                            sliding_window=sliding_window, extra_mask=extra_mask)


def _blockwise_forward(sliding_window, *inputs):
    return blockwise_forward_dense_backward(sliding_window, *inputs), inputs


def _dense_backward(sliding_window, inputs, cotangent):
    queries, keys, values, positions, lengths, query_positions, extra_mask = inputs
    def dense(q, k, v):
        return attend(q, LayerCache(k, v, positions, lengths), query_positions, sliding_window=sliding_window,
                      extra_mask=extra_mask)
    _, vjp = jax.vjp(dense, queries, keys, values)
    no_gradient = [None if x is None else np.zeros(x.shape, jax.dtypes.float0)
                   for x in (positions, lengths, query_positions, extra_mask)]
    return (*vjp(cotangent), *no_gradient)


blockwise_forward_dense_backward.defvjp(_blockwise_forward, _dense_backward)


# Up to this many queries (decoding) or over a cache of at most one block, one dense pass over the
# cache beats the block loop (SmolLM2's decode step on the 2-core CPU: 45 ms against 52 at 2k tokens);
# its scores are no larger than one block's.
DENSE_QUERIES = 16


def xla_attention(queries, layer, query_positions, *, sliding_window=None, extra_mask=None, key_probs=False):
    """The XLA backend: `blockwise_attend` over a uniform cache (`attend`'s gradients), `attend` over a
    ragged one (whose KV heads share one pool), for up to `DENSE_QUERIES` queries and over a cache of
    one block; no statistics on the side (`key_probs` is a request it may ignore)."""
    del key_probs
    if isinstance(layer, RaggedLayerCache) or layer.capacity <= DEFAULT_BLOCK_SIZE or queries.shape[1] <= DENSE_QUERIES:
        out = attend(queries, layer, query_positions, sliding_window=sliding_window, extra_mask=extra_mask)
    else:
        out = blockwise_forward_dense_backward(sliding_window, queries, layer.keys, layer.values, layer.positions,
                                               layer.lengths, query_positions, extra_mask)
    return out, AttentionStats()


def pallas_attention(queries, layer, query_positions, *, sliding_window=None, extra_mask=None, key_probs=False):
    """`pallas_attend` as a backend (no sliding window, no extra mask: `check_request` refuses them)."""
    del sliding_window, extra_mask
    return pallas_attend(queries, layer, query_positions, key_probs=key_probs)


class AttentionBackend(NamedTuple):
    """One attention implementation.

    attend(queries `[B, T, H, D]`, layer, query_positions `[B, T]`, *, sliding_window, extra_mask,
    key_probs) -> (out `[B, T, H, D]`, `AttentionStats`): the chunk's attention over the cache, and
    what it computed on the side (`key_probs` asks for each entry's probability, which a backend
    may not give). attention_mass(layer, queries, query_positions, query_weights `[B, W]`, lse) ->
    `[B, Hkv, C]`: see `attention_mass`. sliding_window / extra_mask: whether `attend` serves a
    sliding window and a per-slot mask `[B, T, C]`.
    """

    name: str
    attend: Callable
    attention_mass: Callable
    sliding_window: bool
    extra_mask: bool


_BACKENDS: dict[str, AttentionBackend] = {}


def register_backend(backend: AttentionBackend) -> AttentionBackend:
    """Makes `backend` available by its name (`attn_impl=backend.name`); returns it."""
    if not isinstance(backend, AttentionBackend):
        raise TypeError(f"backend must be an AttentionBackend, got {type(backend).__name__}.")
    _BACKENDS[backend.name] = backend
    return backend


XLA = register_backend(AttentionBackend("xla", xla_attention, xla_attention_mass, sliding_window=True,
                                        extra_mask=True))
PALLAS = register_backend(AttentionBackend("pallas", pallas_attention, pallas_attention_mass, sliding_window=False,
                                           extra_mask=False))


def backend_names() -> tuple[str, ...]:
    """The names of the registered backends."""
    return tuple(_BACKENDS)


def get_backend(name: str) -> AttentionBackend:
    """The backend registered as `name`."""
    if name not in _BACKENDS:
        raise ValueError(f"attn_impl must be one of {backend_names()}, got {name!r}.")
    return _BACKENDS[name]


def check_request(backend: AttentionBackend, *, sliding_window: int | None = None, extra_mask: bool = False) -> None:
    """Raises if `backend` cannot serve attention with a sliding window or an extra per-slot mask."""
    if sliding_window is not None and not backend.sliding_window:
        raise ValueError(f"the {backend.name!r} attention backend attends to the whole cache and has no sliding "
                         f"window, but this model has one of {sliding_window} tokens; use attn_impl='xla'.")
    if extra_mask and not backend.extra_mask:
        raise ValueError(f"the {backend.name!r} attention backend takes no extra mask over the cache slots (e.g. the "
                         f"gist mask); use attn_impl='xla' for masked attention.")


def check_attn_impl(attn_impl: str, sliding_window: int | None = None) -> AttentionBackend:
    """The backend named `attn_impl`, if it can run a model with `sliding_window`; raises otherwise."""
    backend = get_backend(attn_impl)
    check_request(backend, sliding_window=sliding_window)
    return backend


def attention(queries: Float[Array, "B T H D"], layer: LayerCache | RaggedLayerCache,
              query_positions: Int[Array, "B T"], *, backend: AttentionBackend = XLA,
              sliding_window: int | None = None, extra_mask: Bool[Array, "B T C"] | None = None,
              key_probs: bool = False) -> tuple[Float[Array, "B T H D"], AttentionStats]:
    """The attention of `queries` over the cache with `backend`, and its `AttentionStats`: the one
    entry point models call. Raises if `backend` cannot serve the request."""
    check_request(backend, sliding_window=sliding_window, extra_mask=extra_mask is not None)
    return backend.attend(queries, layer, query_positions, sliding_window=sliding_window, extra_mask=extra_mask,
                          key_probs=key_probs)


def attention_mass(layer: LayerCache | RaggedLayerCache, queries: Float[Array, "B W H D"],
                   query_positions: Int[Array, "B W"], query_weights: Float[Array, "B W"], *,
                   backend: AttentionBackend = XLA,
                   lse: Float[Array, "B H W"] | None = None) -> Float[Array, "B Hkv C"]:
    """Each entry's attention probability (softmax over each query's whole visible row), weighted
    per query and summed over the queries and the query heads of its KV head: the statistic of
    SnapKV's window, H2O's accumulated attention, A2SF and TOVA, computed by `backend` (`lse`, the
    rows' log-sum-exp, may come from the layer's own attention)."""
    return backend.attention_mass(layer, queries, query_positions, query_weights, lse)
