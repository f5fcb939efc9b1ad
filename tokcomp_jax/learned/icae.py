"""In-context autoencoder (Ge et al., ICLR 2024, "In-context Autoencoder for Context Compression in
a Large Language Model", arXiv:2307.06945): the LLM with LoRA adapters (the encoder) reads a context
followed by m learned memory tokens; its final hidden states there are the m memory slots, which the
unchanged LLM (the decoder) reads as input embeddings in place of the context.

Pretraining mixes two objectives, both predicted from the slots alone: autoencoding (decoder input
[slots, [AE], context], reconstructing the context) and language modelling (decoder input [slots,
continuation], the last slot predicting the first continuation token). The decoder's positions start
at 0 with the first slot. At inference the decoder's cache of the m slots is the compressed context.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from tokcomp_jax.cache import KVCache
from tokcomp_jax.learned.distill import continuation_loss, continuation_objective, teacher_logits
from tokcomp_jax.learned.gist import check_pair, check_token_ids, new_token_embeddings
from tokcomp_jax.models.llama import Llama
from tokcomp_jax.training.lora import merge_lora


class ICAE(nnx.Module):
    """ICAE's learned tokens: `num_slots` memory tokens that the encoder reads after the context, and
    the [AE] token that asks the decoder to reconstruct it, initialised as new tokens of the
    vocabulary (`new_token_embeddings`)."""

    def __init__(self, model: Llama, num_slots: int, *, rngs: nnx.Rngs, noise: float = 0.02):
        if num_slots < 1:
            raise ValueError(f"num_slots (memory slots) must be at least 1, got {num_slots}.")
        init = new_token_embeddings(model, num_slots + 1, rngs.params(), noise)
        self.memory_embeddings = nnx.Param(init[:num_slots])
        self.ae_embedding = nnx.Param(init[num_slots])

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


def _forward(model: Llama, embeds: Float[Array, "B T E"], **kwargs):
    """`model` over input embeddings at positions 0 .. T - 1, from an empty cache."""
    batch, steps = embeds.shape[:2]
    out, _, _ = model(jnp.zeros((batch, steps), jnp.int32), model.init_cache(batch, steps),
                      jnp.ones((batch, steps), bool), inputs_embeds=embeds, **kwargs)
    return out


def memory_slots(encoder: Llama, icae: ICAE, context_ids: Int[Array, "B n"]) -> Float[Array, "B m E"]:
    """The m memory slots of each context: the encoder's final hidden states (after the last RMSNorm,
    the reference code's `hidden_states[-1]`) at the memory tokens that follow the context."""
    context_ids = check_token_ids("context_ids", context_ids)
    batch, m = context_ids.shape[0], icae.num_slots
    memory = jnp.broadcast_to(icae.memory_embeddings[...], (batch, m, icae.memory_embeddings.shape[1]))
    embeds = jnp.concatenate([encoder.embed_tokens(context_ids), memory], axis=1)
    return _forward(encoder, embeds, return_hidden=True)[:, -m:]


def _logits(decoder: Llama, embeds: Float[Array, "B T E"], last: int | None) -> Float[Array, "B S V"]:
    """The decoder's logits over `embeds`: at every position, or at the `last` ones only."""
    return decoder.logits(_forward(decoder, embeds, return_hidden=True), last)


def _lm_logits(decoder: Llama, slots, continuation_ids, last: int | None = None):
    return _logits(decoder, jnp.concatenate([slots, decoder.embed_tokens(continuation_ids)], axis=1), last)


def _ae_logits(decoder: Llama, icae: ICAE, slots, context_ids):
    """The logits that predict the context from [slots, [AE], context] (the [AE] token's and the context's)."""
    batch, _, dim = slots.shape
    ae = jnp.broadcast_to(icae.ae_embedding[...], (batch, 1, dim))
    return _logits(decoder, jnp.concatenate([slots, ae, decoder.embed_tokens(context_ids)], axis=1),
                   context_ids.shape[1] + 1)


def icae_logits(encoder: Llama, decoder: Llama, icae: ICAE, context_ids: Int[Array, "B n"],
                continuation_ids: Int[Array, "B c"]) -> Float[Array, "B S V"]:
    """The decoder's logits at every position of [slots, continuation] (S = m + c; the language
    modelling objective's forward), in which the context is seen only through the slots."""
    context_ids, continuation_ids = check_pair(context_ids, continuation_ids)
    return _lm_logits(decoder, memory_slots(encoder, icae, context_ids), continuation_ids)


def icae_loss(encoder: Llama, decoder: Llama, icae: ICAE, context_ids: Int[Array, "B n"],
              continuation_ids: Int[Array, "B c"], *, ae_weight: float = 0.5, distill_weight: float = 0.0
              ) -> tuple[Float[Array, ""], dict]:
    """`ae_weight * ae_loss + (1 - ae_weight) * lm_loss`, both from one encoding of the context, and
    the metrics: ae_loss and ae_accuracy of reconstructing the context from [slots, [AE]]; lm_loss,
    lm_nll, lm_accuracy (and lm_kl) of predicting the continuation from the slots, where lm_loss mixes
    the cross-entropy with, for `distill_weight` > 0, the KL to the decoder reading the full context
    (context distillation, `tokcomp_jax.learned.distill`)."""
    if not 0 <= ae_weight <= 1:
        raise ValueError(f"ae_weight (the autoencoding objective's share) must be in [0, 1], got {ae_weight}.")
    context_ids, continuation_ids = check_pair(context_ids, continuation_ids)
    slots = memory_slots(encoder, icae, context_ids)
    ae, ae_accuracy = continuation_loss(_ae_logits(decoder, icae, slots, context_ids), context_ids)
    teacher = teacher_logits(decoder, context_ids, continuation_ids) if distill_weight else None
    lm, lm_metrics = continuation_objective(_lm_logits(decoder, slots, continuation_ids, continuation_ids.shape[1] + 1),
                                            continuation_ids, teacher, distill_weight)
    metrics = {"ae_loss": ae, "ae_accuracy": ae_accuracy, "lm_loss": lm,
               **{f"lm_{name}": value for name, value in lm_metrics.items()}}
    return ae_weight * ae + (1 - ae_weight) * lm, metrics


@nnx.jit(static_argnames="room")
def _memory_cache(encoder: Llama, decoder: Llama, icae: ICAE, context_ids, room: int) -> KVCache:
    slots = memory_slots(encoder, icae, context_ids)
    batch, m = slots.shape[:2]
    _, cache, _ = decoder(jnp.zeros((batch, m), jnp.int32), decoder.init_cache(batch, m + room),
                          jnp.ones((batch, m), bool), all_logits=False, inputs_embeds=slots)
    return cache


def compress_to_memory(encoder: Llama, decoder: Llama, icae: ICAE, context_ids: Int[Array, "B n"], *,
                       room: int = 0) -> KVCache:
    """The cache a context compresses to: the decoder's m entries per layer and KV head of the memory
    slots (positions 0 .. m - 1), with `room` free slots for what follows; `tc.prefill(decoder, ids,
    cache=...)` and `tc.generate_ids(decoder, ids, cache=...)` continue from it."""
    if room < 0:
        raise ValueError(f"room (free slots after the memory slots) must be >= 0, got {room}.")
    return _memory_cache(encoder, decoder, icae, check_token_ids("context_ids", context_ids), room)
