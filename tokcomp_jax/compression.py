"""The compression boundary: what a model hands a KV-cache compressor for each layer, and takes back.

A model never imports `presses/`, and a press never imports a model. For each layer, right after
the layer's attention has appended a chunk to its `LayerCache`, a model that takes a compressor
builds an `Observation` of the chunk and calls `compressor.compress(layer, obs, state)`, carrying
`state` (from `compressor.init(layer, layer_index)`) from chunk to chunk. Any model that does this
(`CompressibleModel`) gets every press, `tc.prefill` and `tc.generate`.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Protocol, Sequence

import numpy as np
from jaxtyping import Array, Bool, Float, Int

from tokcomp_jax.attention import XLA, AttentionBackend, AttentionStats
from tokcomp_jax.cache import KVCache, LayerCache, RaggedLayerCache


class Observation(NamedTuple):
    """What a compressor may look at for one layer, after the layer's attention ran on a chunk.

    queries / pre_rope_queries: `[B, T, H, D]` the chunk's queries with and without RoPE (equal for
    a model without RoPE); hidden_states: `[B, T, E]` the attention's input; positions / valid:
    `[B, T]` each token's position and whether it is a real token (rows are aligned to the end: a
    row's last tokens are the chunk's last ones); layer_index; room: cache slots to leave free
    after compression; last_chunk: whether this chunk ends the prompt; inv_freq: `[D / 2]` RoPE
    frequencies (None without RoPE); backend: the layer's attention backend, for statistics that
    scorers compute (`tc.attention.attention_mass`); attention: what the layer's attention computed
    on the side (`AttentionStats`, e.g. the rows' log-sum-exp).
    """

    queries: Float[Array, "B T H D"]
    pre_rope_queries: Float[Array, "B T H D"]
    hidden_states: Float[Array, "B T E"]
    positions: Int[Array, "B T"]
    valid: Bool[Array, "B T"]
    layer_index: int
    room: int
    last_chunk: bool
    inv_freq: np.ndarray | None
    backend: AttentionBackend = XLA
    attention: AttentionStats = AttentionStats()


Layer = LayerCache | RaggedLayerCache


class LayerCompressor(Protocol):
    """What a model applies to each layer's cache (every press is one).

    `init(layer, layer_index) -> state` before the first chunk; `compress(layer, obs, state) ->
    (layer, state)` after every chunk's attention. A compressor that compresses after every chunk
    may declare `bounded`, the most entries per (row, KV head) it keeps, for `tc.prefill` to size
    the cache (None: it compresses once the prompt is complete).
    """

    def init(self, layer: Layer, layer_index: int) -> Any: ...

    def compress(self, layer: Layer, obs: Observation, state: Any, **extra) -> tuple[Layer, Any]: ...


class LearnedSuffix(NamedTuple):
    """Learned input tokens run after the prompt, then a compressor (gist tokens, Mu et al., 2023):
    `tc.prefill` appends `embeddings` `[k, E]` to every row as one more chunk, the one `press`
    compresses in. A compressor of its own kind: presses add no input tokens.

    >>> import jax.numpy as jnp, tokcomp_jax as tc
    >>> model = tc.testing.tiny_llama()
    >>> suffix = LearnedSuffix(jnp.zeros((2, model.config.hidden_size)), tc.presses.streaming_llm(tokens=2, n_sink=0))
    >>> _, cache = tc.prefill(model, [[5, 6, 7]], press=suffix)
    >>> cache.layers[0].positions[0, 0].tolist()  # the two learned tokens, after the prompt's 3
    [3, 4]
    """

    embeddings: Float[Array, "k E"]
    press: LayerCompressor


class CompressibleModel(Protocol):
    """A model that `tc.prefill`, `tc.decode` and `tc.generate` run (e.g. `tc.Llama`).

    `config.vocab_size`; `init_cache(batch, capacity) -> KVCache`; calling it on `ids` `[B, T]`
    with `valid` `[B, T]` appends the valid tokens to `cache` at positions continuing from
    `cache.num_seen`, applies `press` (a `LayerCompressor`, or None) to every layer as described in
    this module, and returns `(logits, cache, press_states)`: the logits of every token, or of the
    last one with `all_logits=False`. `room` and `last_chunk` are handed to the press in the
    `Observation`; `press_states` are the per-layer states (from `init_states` when None).
    """

    def init_cache(self, batch: int, capacity: int | Sequence[int]) -> KVCache: ...

    def __call__(self, ids: Int[Array, "B T"], cache: KVCache, valid: Bool[Array, "B T"], *, all_logits: bool = True,
                 press: LayerCompressor | None = None, press_states: tuple | None = None, room: int = 0,
                 last_chunk: bool = True, **kwargs) -> tuple[Array, KVCache, tuple | None]: ...


def init_states(compressor: LayerCompressor | None, cache: KVCache) -> tuple | None:
    """Each layer's initial state of `compressor` (None without one)."""
    if compressor is None:
        return None
    return tuple(compressor.init(layer, index) for index, layer in enumerate(cache.layers))
