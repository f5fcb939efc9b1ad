"""Llama-family decoder in Flax NNX (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2).

GQA, RoPE (with Llama-3 scaling), RMSNorm, SwiGLU, tied or untied embeddings, optional q/k/v
biases (Qwen2) and per-head q/k RMSNorm (Qwen3). Module and parameter names follow Hugging Face's
so that checkpoints map one to one. The forward pass reads and writes an explicit `KVCache`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jaxtyping import Array, Bool, Float, Int

from tokcomp_jax.attention import AttentionBackend, attention, check_attn_impl
from tokcomp_jax.cache import KVCache, LayerCache
from tokcomp_jax.compression import LayerCompressor, Observation, init_states
from tokcomp_jax.models.config import ModelConfig
from tokcomp_jax.models.rope import apply_rope, inverse_frequencies


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019), normalised in float32 as in HF."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


def _linear(in_dim: int, out_dim: int, bias: bool, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(in_dim, out_dim, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class Attention(nnx.Module):
    """Grouped-query self-attention that appends its keys/values to the layer's cache."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.q_proj = _linear(c.hidden_size, c.num_heads * c.head_dim, c.qkv_bias, dtype, rngs)
        self.k_proj = _linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.qkv_bias, dtype, rngs)
        self.v_proj = _linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.qkv_bias, dtype, rngs)
        self.o_proj = _linear(c.num_heads * c.head_dim, c.hidden_size, c.o_bias, dtype, rngs)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype)

    def __call__(self, x: Float[Array, "B T E"], layer: LayerCache, positions: Int[Array, "B T"],
                 valid: Bool[Array, "B T"], backend: AttentionBackend, key_probs: bool = False,
                 extra_mask: Bool[Array, "B T C"] | None = None) -> tuple[Float[Array, "B T E"], LayerCache, tuple]:
        """The attention output, the cache with the chunk appended, and the chunk's queries with
        and without RoPE and the attention's `AttentionStats` (`key_probs`: ask the backend for
        each entry's attention probability; `extra_mask`: slots hidden from each query)."""
        c = self.config
        batch, steps, _ = x.shape
        q = self.q_proj(x).reshape(batch, steps, c.num_heads, c.head_dim)
        k = self.k_proj(x).reshape(batch, steps, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(batch, steps, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = inverse_frequencies(c)
        rotated_q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        layer = layer.append(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), positions, valid)
        out, stats = attention(rotated_q, layer, positions, backend=backend, sliding_window=c.sliding_window,
                               extra_mask=extra_mask, key_probs=key_probs)
        return self.o_proj(out.reshape(batch, steps, c.num_heads * c.head_dim)), layer, (rotated_q, q, stats)


class MLP(nnx.Module):
    """SwiGLU feed-forward (Shazeer, 2020)."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        c = config
        self.gate_proj = _linear(c.hidden_size, c.intermediate_size, c.mlp_bias, dtype, rngs)
        self.up_proj = _linear(c.hidden_size, c.intermediate_size, c.mlp_bias, dtype, rngs)
        self.down_proj = _linear(c.intermediate_size, c.hidden_size, c.mlp_bias, dtype, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm transformer block: attention then MLP, each with a residual."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype, rngs)

    def __call__(self, x, layer: LayerCache, positions, valid, backend: AttentionBackend,
                 press: LayerCompressor | None = None, press_state=None, room: int = 0, layer_index: int = 0,
                 last_chunk: bool = True, extra_mask=None):
        """The block's output and cache; `press`, if given, compresses the cache after attention
        (`tc.compression`)."""
        attn_input = self.input_layernorm(x)
        attn_out, layer, (queries, pre_rope_queries, stats) = self.self_attn(
            attn_input, layer, positions, valid, backend, key_probs=press is not None, extra_mask=extra_mask)
        if press is not None:
            obs = Observation(queries, pre_rope_queries, attn_input, positions, valid, layer_index, room,
                              last_chunk, inverse_frequencies(self.self_attn.config), backend, stats)
            layer, press_state = press.compress(layer, obs, press_state)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x)), layer, press_state


class Llama(nnx.Module):
    """A Llama-family causal LM over an explicit KV cache.

    Calling it on `ids` `[B, T]` appends the tokens marked `valid` to `cache`, at positions that
    continue from `cache.num_seen`, and returns the logits of all T tokens, or of the last one
    (index T-1: callers align each row's last token to the end, see `tc.prefill`), with the
    updated cache.

    `attn_impl` names the attention backend (`tc.attention`) of the model and of the presses'
    scorers: "xla" (the default, blockwise) or "pallas" (`pallas_kernels`, interpreted on CPU). It may be
    changed on a built model (`model.attn_impl = "pallas"`); jitted calls compile once per value.
    A request the backend cannot serve (a sliding window, an `extra_mask` for Pallas) raises.

    Two static attributes serve training (the trainer sets them; None and False change nothing):
    `activation_sharding`, a `NamedSharding` of the `[B, T, E]` hidden states, is imposed
    (`jax.lax.with_sharding_constraint`) on the embeddings, on each layer's output and on the final
    hidden states, so that sharding propagation keeps them split over rows and cannot carry the
    weights' FSDP layout into them; `remat` rematerialises each decoder layer: the backward pass
    keeps only the layer's inputs and runs its forward again (`jax.checkpoint_policies.nothing_saveable`:
    nothing inside a layer is kept, not even the [H, S, S] attention probabilities).
    """

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, attn_impl: str = "xla",
                 activation_sharding: NamedSharding | None = None, remat: bool = False):
        check_attn_impl(attn_impl, config.sliding_window)
        if activation_sharding is not None and not isinstance(activation_sharding, NamedSharding):
            raise TypeError(f"activation_sharding must be a jax.sharding.NamedSharding of [B, T, E] hidden states or "
                            f"None, got {type(activation_sharding).__name__}; see tokcomp_jax.sharding."
                            f"activation_sharding(mesh).")
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.attn_impl = attn_impl
        self.activation_sharding = activation_sharding
        self.remat = bool(remat)
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                      param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, dtype, rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        if not config.tie_word_embeddings:
            self.lm_head = _linear(config.hidden_size, config.vocab_size, False, dtype, rngs)

    def check_cache(self, cache: KVCache) -> None:
        """Raises if `cache` was not made for this model (layers, KV heads, head size)."""
        c = self.config
        if len(cache.layers) != c.num_layers:
            raise ValueError(f"cache has {len(cache.layers)} layers but the model has {c.num_layers}; "
                             f"make it with model.init_cache.")
        for layer in cache.layers:
            if layer.lengths.shape[1] != c.num_kv_heads or layer.keys.shape[-1] != c.head_dim:
                raise ValueError(f"cache holds {layer.lengths.shape[1]} KV heads of size {layer.keys.shape[-1]} but "
                                 f"the model has {c.num_kv_heads} of size {c.head_dim}; make it with model.init_cache.")

    def init_cache(self, batch: int, capacity: int | list[int]) -> KVCache:
        """An empty cache of `capacity` entries per layer (an int, or one per layer)."""
        c = self.config
        return KVCache.empty(c.num_layers, batch, c.num_kv_heads, capacity, c.head_dim, self.dtype)

    def __call__(self, ids: Int[Array, "B T"], cache: KVCache, valid: Bool[Array, "B T"], *,
                 all_logits: bool = True, press: LayerCompressor | None = None, press_states: tuple | None = None,
                 room: int = 0, last_chunk: bool = True, inputs_embeds: Float[Array, "B T E"] | None = None,
                 extra_mask: Bool[Array, "B T C"] | None = None, return_hidden: bool = False):
        """Returns (logits, cache, press_states). With a `press` (any `tc.compression.LayerCompressor`),
        each layer's cache goes through it right after the layer's attention (kvpress semantics);
        `press_states` (one per layer, from `press.init` when None) carry what it observed in earlier
        chunks. `inputs_embeds`
        replaces the tokens' embeddings (learned tokens such as gists); `extra_mask` `[B, T, C]`
        hides cache slots from the chunk's queries in every layer (a backend without masks raises).
        `return_hidden` returns the final hidden states (after the last RMSNorm, as Hugging Face's
        `hidden_states[-1]`; in the model's dtype) in place of the logits."""
        self.check_cache(cache)
        backend = check_attn_impl(self.attn_impl, self.config.sliding_window)
        positions = cache.num_seen[:, None] + jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1
        if press_states is None:
            press_states = init_states(press, cache)
        x = self.embed_tokens(ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        x = self._constrain(x)

        def run(block, x, layer, state, index):
            return block(x, layer, positions, valid, backend, press, state, room, index, last_chunk, extra_mask)
        if self.remat:
            run = nnx.remat(run, policy=jax.checkpoint_policies.nothing_saveable, static_argnums=4)
        layers, states = [], []
        for index, (block, layer) in enumerate(zip(self.layers, cache.layers)):
            x, layer, state = run(block, x, layer, press_states[index] if press is not None else None, index)
            x = self._constrain(x)
            layers.append(layer)
            states.append(state)
        x = self._constrain(self.norm(x)) if all_logits else self.norm(x[:, -1])
        num_seen = cache.num_seen + jnp.sum(valid, axis=1, dtype=jnp.int32)
        cache, states = KVCache(tuple(layers), num_seen), tuple(states) if press is not None else None
        if return_hidden:
            return x, cache, states
        return self.logits(x), cache, states

    def logits(self, hidden: Float[Array, "B T E"], last: int | None = None) -> Float[Array, "B S V"]:
        """float32 logits of final hidden states (`return_hidden`'s), of every position or of the
        `last` ones only (the head runs on those alone): the LM head, or the tied embeddings."""
        hidden = hidden if last is None else hidden[:, -last:]
        logits = self.lm_head(hidden) if hasattr(self, "lm_head") else self.embed_tokens.attend(hidden)
        return logits.astype(jnp.float32)

    def _constrain(self, x: Float[Array, "B T E"]) -> Float[Array, "B T E"]:
        if self.activation_sharding is None:
            return x
        return jax.lax.with_sharding_constraint(x, self.activation_sharding)
