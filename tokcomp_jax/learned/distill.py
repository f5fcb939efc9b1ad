"""Context distillation (Snell, Klein & Zhong, 2022, "Learning by Distilling Context",
arXiv:2209.15189) as an optional objective of the learned compressors: the base model (without the
trained adapters or updates) reading the full context is the teacher, and the compressed form is
trained to give the continuation the same next-token distributions, KL(teacher || student) at every
continuation position, alongside (or in place of) the continuation's cross-entropy. Soft targets
carry what the context implies about every next token, not just the one that followed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from tokcomp_jax.models.llama import Llama


def _predicting(logits: Float[Array, "B S V"], m: int) -> Float[Array, "B m V"]:
    """The log-probabilities that predict the last m tokens of the sequence the logits are of."""
    return jax.nn.log_softmax(logits[:, -m - 1:-1].astype(jnp.float32), axis=-1)


def continuation_loss(logits: Float[Array, "B S V"], continuation_ids: Int[Array, "B m"]
                      ) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Mean cross-entropy and accuracy of the last m tokens, `continuation_ids`, from the logits of
    the sequence that ends with them (position S - m - 1 predicts the first)."""
    m = continuation_ids.shape[1]
    logp = _predicting(logits, m)
    targets = jnp.asarray(continuation_ids)
    nll = -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
    return nll, jnp.mean(jnp.argmax(logp, axis=-1) == targets)


def teacher_logits(model: Llama, context_ids: Int[Array, "B n"], continuation_ids: Int[Array, "B m"]
                   ) -> Float[Array, "B m+1 V"]:
    """The teacher's logits, gradients stopped: `model` reading [context, continuation] with plain
    causal attention, at the m + 1 positions from the context's last token on."""
    ids = jnp.concatenate([context_ids, continuation_ids], axis=1)
    batch, steps = ids.shape
    hidden, _, _ = model(ids, model.init_cache(batch, steps), jnp.ones(ids.shape, bool), return_hidden=True)
    return jax.lax.stop_gradient(model.logits(hidden, continuation_ids.shape[1] + 1))


def continuation_objective(logits: Float[Array, "B S V"], continuation_ids: Int[Array, "B m"],
                           teacher: Float[Array, "B T V"] | None = None, distill_weight: float = 0.0
                           ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """`(1 - distill_weight) * nll + distill_weight * kl` of the continuation and the metrics nll,
    accuracy and (with a `teacher`) kl, the mean KL(teacher || student) per continuation token."""
    nll, accuracy = continuation_loss(logits, continuation_ids)
    metrics = {"nll": nll, "accuracy": accuracy}
    if teacher is None:
        return nll, metrics
    m = continuation_ids.shape[1]
    teacher_logp = _predicting(teacher, m)
    kl = jnp.mean(jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - _predicting(logits, m)), axis=-1))
    return (1 - distill_weight) * nll + distill_weight * kl, {**metrics, "kl": kl}
