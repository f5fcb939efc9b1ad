"""Gist tokens (Mu, Li & Goodman, 2023, "Learning to Compress Prompts with Gist Tokens",
arXiv:2304.08467): k learned tokens placed after a context; under the gist mask the tokens after
them see the gists but not the context, so training makes the gists' KV entries carry it. At
inference those k entries per layer are the whole compressed cache.

Sequences are [context (n tokens), gists (k), continuation (m)] at positions 0 .. n + k + m - 1;
the continuation is predicted from the last gist on.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from tokcomp_jax.cache import KVCache, LayerCache
from tokcomp_jax.compression import LearnedSuffix
from tokcomp_jax.generation import prefill
from tokcomp_jax.learned.distill import continuation_objective, teacher_logits
from tokcomp_jax.learned.gist_mask import gist_mask
from tokcomp_jax.models.llama import Llama
from tokcomp_jax.presses.base import Press, keep_top, no_state


def new_token_embeddings(model: Llama, count: int, key: jax.Array, noise: float = 0.02) -> Float[Array, "count E"]:
    """`count` float32 embeddings of new tokens of the vocabulary: the mean of the model's token
    embeddings plus Gaussian noise of `noise` times their standard deviation (distinct tokens)."""
    table = model.embed_tokens.embedding[...].astype(jnp.float32)
    std = noise * jnp.std(table)
    return jnp.mean(table, axis=0) + std * jax.random.normal(key, (count, table.shape[1]))


class GistTokens(nnx.Module):
    """`num_tokens` learned input embeddings, initialised as new tokens of the vocabulary
    (`new_token_embeddings`)."""

    def __init__(self, model: Llama, num_tokens: int, *, rngs: nnx.Rngs, noise: float = 0.02):
        if num_tokens < 1:
            raise ValueError(f"num_tokens (gist tokens) must be at least 1, got {num_tokens}.")
        self.embeddings = nnx.Param(new_token_embeddings(model, num_tokens, rngs.params(), noise))

    @property
    def num_tokens(self) -> int:
        return self.embeddings.shape[0]


def check_token_ids(name: str, ids) -> jax.Array:
    ids = jnp.asarray(ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer) or ids.shape[1] < 1:
        raise ValueError(f"{name} must be integer token ids shaped [B, n] with n >= 1, got shape {ids.shape} "
                         f"and dtype {ids.dtype}.")
    return ids.astype(jnp.int32)


def check_pair(context_ids, continuation_ids) -> tuple[jax.Array, jax.Array]:
    """`check_token_ids` of both, which must have the same rows."""
    context_ids = check_token_ids("context_ids", context_ids)
    continuation_ids = check_token_ids("continuation_ids", continuation_ids)
    if continuation_ids.shape[0] != context_ids.shape[0]:
        raise ValueError(f"continuation_ids has {continuation_ids.shape[0]} rows but context_ids has "
                         f"{context_ids.shape[0]}.")
    return context_ids, continuation_ids


def _with_gists(model: Llama, gists: GistTokens, context_ids, continuation_ids=None):
    """Token ids (0 at the gists), input embeddings and the gist flags of [context, gists, continuation]."""
    if continuation_ids is None:
        context_ids = check_token_ids("context_ids", context_ids)
    else:
        context_ids, continuation_ids = check_pair(context_ids, continuation_ids)
    batch, n = context_ids.shape
    k = gists.num_tokens
    parts = [context_ids, jnp.zeros((batch, k), jnp.int32)]
    if continuation_ids is not None:
        parts.append(continuation_ids)
    ids = jnp.concatenate(parts, axis=1)
    is_gist = (jnp.arange(ids.shape[1]) >= n) & (jnp.arange(ids.shape[1]) < n + k)
    is_gist = jnp.broadcast_to(is_gist, ids.shape)
    embeds = model.embed_tokens(ids)
    gist_index = jnp.clip(jnp.arange(ids.shape[1]) - n, 0, k - 1)
    embeds = jnp.where(is_gist[..., None], gists.embeddings[...].astype(embeds.dtype)[gist_index], embeds)
    return ids, embeds, is_gist


def gist_logits(model: Llama, gists: GistTokens, context_ids: Int[Array, "B n"],
                continuation_ids: Int[Array, "B m"], last: int | None = None) -> Float[Array, "B S V"]:
    """Logits of every position of [context, gists, continuation] under the gist mask (training), or
    of its `last` positions only (the LM head runs on those alone)."""
    ids, embeds, is_gist = _with_gists(model, gists, context_ids, continuation_ids)
    batch, steps = ids.shape
    cache = model.init_cache(batch, steps)  # slot s holds position s: the mask's key index is the slot
    hidden, _, _ = model(ids, cache, jnp.ones(ids.shape, bool), inputs_embeds=embeds,
                         extra_mask=gist_mask(is_gist), return_hidden=True)
    return model.logits(hidden, last)


def gist_loss(model: Llama, gists: GistTokens, context_ids: Int[Array, "B n"], continuation_ids: Int[Array, "B m"],
              *, distill_weight: float = 0.0, teacher_model: Llama | None = None
              ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """The continuation's loss and metrics (`continuation_objective`) when it sees the context only
    through the gists: its cross-entropy, mixed for `distill_weight` > 0 with its KL to
    `teacher_model` (default: `model`) reading the full context (context distillation). Where `model`
    carries trained adapters, pass the base model as the teacher: a teacher that shares the trained
    weights drifts with them, and with distillation alone both collapse onto one constant output."""
    context_ids, continuation_ids = check_pair(context_ids, continuation_ids)
    logits = gist_logits(model, gists, context_ids, continuation_ids, continuation_ids.shape[1] + 1)
    teacher_model = model if teacher_model is None else teacher_model
    teacher = teacher_logits(teacher_model, context_ids, continuation_ids) if distill_weight else None
    return continuation_objective(logits, continuation_ids, teacher, distill_weight)


def gist_press(gists: GistTokens) -> LearnedSuffix:
    """Trained gists as a compressor: `tc.prefill` / `tc.generate` run the gist tokens after the
    prompt and the cache keeps only their k entries per layer and KV head (plus the room asked for).

    >>> import tokcomp_jax as tc
    >>> from flax import nnx
    >>> model = tc.testing.tiny_llama()
    >>> press = gist_press(GistTokens(model, 2, rngs=nnx.Rngs(0)))
    >>> _, cache = tc.prefill(model, [[5, 6, 7, 8], [9, 10]], press=press, capacity=12)
    >>> cache.lengths[0].tolist(), cache.capacities[0], cache.num_seen.tolist()
    ([[2, 2], [2, 2]], 10, [6, 4])
    """
    # One press per number of gists: a jitted prefill compiles once for all gists of that number.
    return LearnedSuffix(gists.embeddings[...], Press(init=no_state, compress=_keep_latest(gists.num_tokens)))


def keep_latest(layer: LayerCache, k: int, room: int) -> LayerCache:
    """Each row's and KV head's latest k entries (learned tokens appended last), in a cache of
    k + `room` slots."""
    return keep_top(layer, layer.positions, jnp.minimum(layer.lengths, k), k + room)


@functools.cache
def _keep_latest(k: int):
    """A press's compress that keeps each row's latest k entries (the gists) after the last chunk."""
    def compress(layer, obs, state, **extra):
        del extra
        if not obs.last_chunk:
            return layer, state
        return keep_latest(layer, k, obs.room), state
    return compress


def compress_to_gists(model: Llama, gists: GistTokens, context_ids: Int[Array, "B n"], *,
                      room: int = 0) -> KVCache:
    """The cache a context compresses to: the gists' k entries per layer and KV head (run after the
    context, which is plain causal attention), with `room` free slots for what follows."""
    if room < 0:
        raise ValueError(f"room (free slots after the gists) must be >= 0, got {room}.")
    context_ids = check_token_ids("context_ids", context_ids)
    _, cache = prefill(model, np.asarray(context_ids), press=gist_press(gists),
                       capacity=context_ids.shape[1] + room)
    return cache
