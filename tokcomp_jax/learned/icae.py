"""In-context autoencoder (Ge et al., ICLR 2024, "In-context Autoencoder for Context Compression in
a Large Language Model", arXiv:2307.06945): the LLM with LoRA adapters (the encoder) reads a context
followed by m learned memory tokens; its final hidden states there are the m memory slots, which the
unchanged LLM (the decoder) reads as input embeddings in place of the context.

Pretraining mixes two objectives, both predicted from the memory alone: autoencoding (the decoder
reads [AE] and reconstructs the context) and language modelling (the decoder predicts the
continuation, the last memory position predicting its first token). The decoder's positions start
at 0 with the first slot. At inference the decoder's cache of the m slots is the compressed context.

`memory="kv"` is 500xCompressor's form (Li, Su & Collier, ACL 2025, arXiv:2408.03094): the memory
is the encoder's own KV entries at the m memory tokens (positions n .. n + m - 1), which the frozen
decoder attends to in every layer, in place of input embeddings that it reads through all layers.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from tokcomp_jax.cache import KVCache
from tokcomp_jax.learned.distill import continuation_loss, continuation_objective, teacher_logits
from tokcomp_jax.learned.gist import check_pair, check_token_ids, keep_latest, new_token_embeddings
from tokcomp_jax.models.llama import Llama
from tokcomp_jax.training.lora import merge_lora

MEMORY_FORMS = ("embeddings", "kv")


class ICAE(nnx.Module):
    """ICAE's learned tokens: `num_slots` memory tokens that the encoder reads after the context, and
    the [AE] token that asks the decoder to reconstruct it, initialised as new tokens of the
    vocabulary (`new_token_embeddings`); `memory` is the form the decoder reads (`MEMORY_FORMS`):
    the slots as input embeddings (the paper) or the encoder's KV entries at the memory tokens."""

    def __init__(self, model: Llama, num_slots: int, *, rngs: nnx.Rngs, noise: float = 0.02,
                 memory: str = "embeddings"):
        if num_slots < 1:
            raise ValueError(f"num_slots (memory slots) must be at least 1, got {num_slots}.")
        if memory not in MEMORY_FORMS:
            raise ValueError(f"memory must be one of {MEMORY_FORMS}, got {memory!r}.")
        init = new_token_embeddings(model, num_slots + 1, rngs.params(), noise)
        self.memory_embeddings = nnx.Param(init[:num_slots])
        self.ae_embedding = nnx.Param(init[num_slots])
        self.memory = memory

    @property
    def num_slots(self) -> int:
        return self.memory_embeddings.shape[0]


class ICAEParams(nnx.Module):
    """What the ICAE task trains: the learned tokens (`icae`) and the encoder's LoRA adapters
    (`lora`, as `tokcomp_jax.training.init_lora` makes them, held as `nnx.Param`s)."""

    def __init__(self, icae: ICAE, adapters: Mapping):
        self.icae = icae
        self.lora = nnx.data(jax.tree.map(nnx.Param, dict(adapters)))

    @property
    def adapters(self) -> dict:
        """The LoRA adapters as arrays, for `lora_encoder`."""
        return jax.tree.map(lambda p: p[...], self.lora, is_leaf=lambda x: isinstance(x, nnx.Variable))


def lora_encoder(model: Llama, adapters: Mapping, scale: float) -> Llama:
    """The encoder: a new `Llama` whose adapted kernels are W + A @ B * scale (scale = alpha / rank);
    `model` itself, the decoder, is unchanged."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, merge_lora(nnx.to_pure_dict(state), adapters, scale))


def _over_embeds(model: Llama, embeds: Float[Array, "B T E"], cache: KVCache) -> tuple[Float[Array, "B T E"], KVCache]:
    """`model` over input embeddings after what `cache` holds: its final hidden states (after the
    last RMSNorm, the reference code's `hidden_states[-1]`) and the cache with them."""
    batch, steps = embeds.shape[:2]
    hidden, cache, _ = model(jnp.zeros((batch, steps), jnp.int32), cache, jnp.ones((batch, steps), bool),
                             inputs_embeds=embeds, return_hidden=True)
    return hidden, cache


def _encode(encoder: Llama, icae: ICAE, context_ids: Int[Array, "B n"]) -> tuple[Float[Array, "B n+m E"], KVCache]:
    """The encoder over [context, memory tokens] at positions 0 .. n + m - 1: its final hidden states
    and its cache."""
    context_ids = check_token_ids("context_ids", context_ids)
    batch, m = context_ids.shape[0], icae.num_slots
    memory = jnp.broadcast_to(icae.memory_embeddings[...], (batch, m, icae.memory_embeddings.shape[1]))
    embeds = jnp.concatenate([encoder.embed_tokens(context_ids), memory], axis=1)
    return _over_embeds(encoder, embeds, encoder.init_cache(batch, embeds.shape[1]))


def memory_slots(encoder: Llama, icae: ICAE, context_ids: Int[Array, "B n"]) -> Float[Array, "B m E"]:
    """The m memory slots of each context: the encoder's final hidden states at the memory tokens
    that follow the context."""
    return _encode(encoder, icae, context_ids)[0][:, -icae.num_slots:]


def memory_cache(encoder: Llama, decoder: Llama, icae: ICAE, context_ids: Int[Array, "B n"], room: int
                 ) -> tuple[KVCache, Float[Array, "B 1 V"]]:
    """The decoder's cache of a context's memory, m entries per layer and KV head with `room` free
    slots, and the logits of the last memory position (which predict the token after it): the
    decoder's over the slots (`memory="embeddings"`), or the encoder's at the memory tokens ("kv")."""
    hidden, cache = _encode(encoder, icae, context_ids)
    m = icae.num_slots
    if icae.memory == "kv":
        layers = tuple(keep_latest(layer, m, room) for layer in cache.layers)
        return KVCache(layers, cache.num_seen), encoder.logits(hidden, 1)
    hidden, cache = _over_embeds(decoder, hidden[:, -m:], decoder.init_cache(hidden.shape[0], m + room))
    return cache, decoder.logits(hidden, 1)


def _read(decoder: Llama, cache: KVCache, embeds: Float[Array, "B T E"]) -> Float[Array, "B T V"]:
    """The decoder's logits over `embeds`, read after the memory in `cache`."""
    return decoder.logits(_over_embeds(decoder, embeds, cache)[0])


def _continuation_logits(decoder: Llama, cache: KVCache, first: Float[Array, "B 1 V"],
                         continuation_ids: Int[Array, "B c"]) -> Float[Array, "B 1+c V"]:
    """The last memory position's logits (`first`) and the decoder's over the continuation."""
    return jnp.concatenate([first, _read(decoder, cache, decoder.embed_tokens(continuation_ids))], axis=1)


def icae_logits(encoder: Llama, decoder: Llama, icae: ICAE, context_ids: Int[Array, "B n"],
                continuation_ids: Int[Array, "B c"]) -> Float[Array, "B 1+c V"]:
    """The logits of the last memory position and of every continuation token (the language
    modelling objective's forward), in which the decoder sees the context only through the memory."""
    context_ids, continuation_ids = check_pair(context_ids, continuation_ids)
    cache, first = memory_cache(encoder, decoder, icae, context_ids, continuation_ids.shape[1])
    return _continuation_logits(decoder, cache, first, continuation_ids)


def icae_loss(encoder: Llama, decoder: Llama, icae: ICAE, context_ids: Int[Array, "B n"],
              continuation_ids: Int[Array, "B c"], *, ae_weight: float = 0.5, distill_weight: float = 0.0
              ) -> tuple[Float[Array, ""], dict]:
    """`ae_weight * ae_loss + (1 - ae_weight) * lm_loss`, both from one encoding of the context, and
    the metrics: lm_loss, lm_nll, lm_accuracy (and lm_kl) of predicting the continuation from the
    memory, where lm_loss mixes the cross-entropy with, for `distill_weight` > 0, the KL to the
    decoder reading the full context (context distillation, `tokcomp_jax.learned.distill`); for
    `ae_weight` > 0, ae_loss and ae_accuracy of reconstructing the context from [memory, [AE]]."""
    if not 0 <= ae_weight <= 1:
        raise ValueError(f"ae_weight (the autoencoding objective's share) must be in [0, 1], got {ae_weight}.")
    context_ids, continuation_ids = check_pair(context_ids, continuation_ids)
    (batch, n), c = context_ids.shape, continuation_ids.shape[1]
    cache, first = memory_cache(encoder, decoder, icae, context_ids, max(c, n + 1) if ae_weight else c)
    logits = _continuation_logits(decoder, cache, first, continuation_ids)
    teacher = teacher_logits(decoder, context_ids, continuation_ids) if distill_weight else None
    lm, lm_metrics = continuation_objective(logits, continuation_ids, teacher, distill_weight)
    metrics = {"lm_loss": lm, **{f"lm_{name}": value for name, value in lm_metrics.items()}}
    if not ae_weight:
        return lm, metrics
    ae_token = jnp.broadcast_to(icae.ae_embedding[...], (batch, 1, icae.ae_embedding.shape[0]))
    ae_logits = _read(decoder, cache, jnp.concatenate([ae_token, decoder.embed_tokens(context_ids)], axis=1))
    metrics["ae_loss"], metrics["ae_accuracy"] = continuation_loss(ae_logits, context_ids)
    return ae_weight * metrics["ae_loss"] + (1 - ae_weight) * lm, metrics


@nnx.jit(static_argnames="room")
def _memory_cache(encoder: Llama, decoder: Llama, icae: ICAE, context_ids, room: int) -> KVCache:
    return memory_cache(encoder, decoder, icae, context_ids, room)[0]


def compress_to_memory(encoder: Llama, decoder: Llama, icae: ICAE, context_ids: Int[Array, "B n"], *,
                       room: int = 0) -> KVCache:
    """The cache a context compresses to: m entries per layer and KV head (`memory_cache`), with
    `room` free slots for what follows; `tc.prefill(decoder, ids, cache=...)` and
    `tc.generate_ids(decoder, ids, cache=...)` continue from it."""
    if room < 0:
        raise ValueError(f"room (free slots after the memory slots) must be >= 0, got {room}.")
    return _memory_cache(encoder, decoder, icae, check_token_ids("context_ids", context_ids), room)
