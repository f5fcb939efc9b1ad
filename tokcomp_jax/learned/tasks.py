"""The learned compressors as training tasks: `config.task = "gist"` in a `configs/train_*.py`.

Rows are windows of `config.data.window` corpus tokens; the first `context_tokens` are the context
to compress and the rest the continuation the model predicts from the compressed form alone.

gist (Mu, Li & Goodman, 2023, arXiv:2304.08467): `config.gist.num_tokens` learned gist tokens after
the context, under the gist mask; the trained parameters are the gist embeddings, and the model's
with `config.trainable` "full" or "lora" ("none" trains the gists alone, the model frozen).

icae (Ge et al., 2024, arXiv:2307.06945): a LoRA-adapted encoder turns the context into
`config.icae.num_slots` memory slots that the frozen model decodes from (`tokcomp_jax.learned.icae`);
`config.icae.memory = "kv"` hands the decoder the encoder's KV entries at the slots instead
(500xCompressor, arXiv:2408.03094).
"""
from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from tokcomp_jax.learned.gist import GistTokens, gist_loss
from tokcomp_jax.learned.icae import ICAE, MEMORY_FORMS, ICAEParams, icae_loss, lora_encoder
from tokcomp_jax.training.config import check_count, check_fraction, check_lora_fields, names
from tokcomp_jax.training.errors import ConfigError
from tokcomp_jax.training.lora import init_lora
from tokcomp_jax.training.tasks import Task, register_task


def check_context_fields(config: ml_collections.ConfigDict, name: str, count_field: str) -> None:
    """Raises `ConfigError` unless `config[name]` holds a positive `count_field` and a `context_tokens`
    that leaves at least one continuation token of `config.data.window`."""
    fields = config.get(name)
    if fields is None:
        raise ConfigError(f"config.task {name!r} reads config.{name}; add config.{name} = ml_collections."
                          f"ConfigDict({{'{count_field}': ..., 'context_tokens': ...}}) to the config.")
    for field in (count_field, "context_tokens"):
        check_count(fields.get(field), f"{name}.{field}")
    if config.data.window <= fields.context_tokens:
        raise ConfigError(f"config.data.window ({config.data.window}) must exceed config.{name}.context_tokens "
                          f"({fields.context_tokens}): the tokens after the context are the continuation.")


def distill_weight_of(config: ml_collections.ConfigDict, name: str) -> float:
    """`config[name].distill_weight`, the share of context distillation in the continuation's loss
    (`tokcomp_jax.learned.distill`); 0 (the paper's cross-entropy alone) where the field is absent."""
    weight = config[name].get("distill_weight", 0.0)
    check_fraction(weight, f"{name}.distill_weight")
    return weight


def split_window(config: ml_collections.ConfigDict, name: str, batch):
    """(context, continuation) ids of a batch of windows."""
    ids, n = batch["ids"], config[name].context_tokens
    return ids[:, :n], ids[:, n:]


def gist_task(config: ml_collections.ConfigDict) -> Task:
    """Gist tokens: the continuation's cross-entropy under the gist mask, mixed with context
    distillation by `config.gist.distill_weight` (`gist_loss`), the base model (without the trained
    adapters or updates) reading the full context as the teacher."""
    check_context_fields(config, "gist", "num_tokens")
    distill_weight = distill_weight_of(config, "gist")

    def init(config, model, tokenizer):
        del tokenizer
        return GistTokens(model, config.gist.num_tokens, rngs=nnx.Rngs(config.seed))

    def loss(model, gists, batch, base_model=None):
        context, continuation = split_window(config, "gist", batch)
        return gist_loss(model, gists, context, continuation, distill_weight=distill_weight, teacher_model=base_model)

    return Task(init=init, loss=loss, extra_axes={"embeddings": (None, "embed")}, no_decay=("embeddings",),
                reads_base_model=distill_weight > 0)


def icae_task(config: ml_collections.ConfigDict) -> Task:
    """ICAE pretraining: each window's context compresses into `config.icae.num_slots` memory slots,
    from which the frozen model (`config.trainable` "none") reconstructs it (weight
    `config.icae.ae_weight`) and predicts the continuation (with context distillation by
    `config.icae.distill_weight`, `icae_loss`), reading the memory in the form `config.icae.memory`
    ("embeddings" where absent, or "kv"). Trained: the memory and [AE] embeddings and the encoder's
    LoRA adapters (`config.lora` rank, alpha and targets)."""
    if config.trainable != "none":
        raise ConfigError(f"config.trainable must be 'none' for task 'icae', got {config.trainable!r}: the decoder "
                          f"is the frozen model, and the encoder's LoRA adapters (config.lora) are the task's own.")
    check_context_fields(config, "icae", "num_slots")
    ae_weight = config.icae.get("ae_weight")
    check_fraction(ae_weight, "icae.ae_weight")
    check_lora_fields(config)
    distill_weight = distill_weight_of(config, "icae")
    memory = config.icae.get("memory", "embeddings")
    if memory not in MEMORY_FORMS:
        raise ConfigError(f"config.icae.memory must be one of {MEMORY_FORMS}, got {memory!r}.")
    scale = config.lora.alpha / config.lora.rank

    def init(config, model, tokenizer):
        del tokenizer
        tokens_key, lora_key = jax.random.split(jax.random.key(config.seed))
        adapters = init_lora(nnx.to_pure_dict(nnx.state(model)), names(config.lora.targets), config.lora.rank,
                             lora_key)
        icae = ICAE(model, config.icae.num_slots, rngs=nnx.Rngs(params=tokens_key), memory=memory)
        return ICAEParams(icae, adapters)

    def loss(model, params, batch):
        context, continuation = split_window(config, "icae", batch)
        return icae_loss(lora_encoder(model, params.adapters, scale), model, params.icae, context, continuation,
                         ae_weight=ae_weight, distill_weight=distill_weight)

    return Task(init=init, loss=loss, extra_axes={"memory_embeddings": (None, "embed"), "ae_embedding": ("embed",)},
                no_decay=("memory_embeddings", "ae_embedding"))


register_task("gist", gist_task)
register_task("icae", icae_task)
