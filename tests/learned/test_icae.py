"""ICAE (Ge et al., 2024): the memory slots are the LoRA encoder's final hidden states and carry the
context (or, in 500xCompressor's "kv" form, the encoder's KV entries at the memory tokens); the
decoder's cache of the memory continues like the training forward; the task trains the adapters and
the learned tokens with the decoder frozen."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

import tokcomp_jax as tc
from tokcomp_jax.learned.icae import (ICAE, compress_to_memory, icae_logits, icae_loss, lora_encoder,
                                      memory_slots)
from tokcomp_jax.training import ConfigError, Trainer, check_config, init_lora
from tolerances import log_probability, model_tolerance, reordered_sum
from training_worker import tiny_config

M = 3  # memory slots


def encoder_decoder_tolerance(config, sequence_length, magnitude):
    """`model_tolerance` of the encoder's layers and then the decoder's: the context reaches the
    logits through both."""
    return 2 * model_tolerance(config, sequence_length, magnitude)


logits_of, slots_of = nnx.jit(icae_logits), nnx.jit(memory_slots)
loss_of = nnx.jit(icae_loss, static_argnames="ae_weight")


@pytest.fixture(scope="module")
def parts():
    """The decoder, the ICAE tokens, LoRA adapters at init (B = 0) and trained-looking ones (B != 0)."""
    model = tc.testing.tiny_llama(seed=1)
    icae = ICAE(model, M, rngs=nnx.Rngs(0))
    initial = init_lora(nnx.to_pure_dict(nnx.state(model)), ("q_proj", "v_proj"), 2, jax.random.key(0))
    trained = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(1), x.shape), initial)
    return model, icae, initial, trained


@pytest.mark.parametrize("memory, first_position", [("embeddings", 0), ("kv", 9)])
def test_the_memory_cache_continues_like_the_training_forward(parts, memory, first_position):
    model, _, _, adapters = parts
    icae = ICAE(model, M, rngs=nnx.Rngs(0), memory=memory)
    encoder = lora_encoder(model, adapters, scale=2.0)
    rng = np.random.default_rng(0)
    context, continuation = rng.integers(1, 64, (2, 9)), rng.integers(1, 64, (2, 5))
    training = logits_of(encoder, model, icae, context, continuation)
    assert training.shape == (2, 1 + 5, 64)
    cache = compress_to_memory(encoder, model, icae, context, room=6)
    assert cache.lengths.tolist() == [[[M, M]] * 2] * 2 and cache.num_seen.tolist() == [first_position + M] * 2
    assert cache.capacities == (M + 6, M + 6)
    assert cache.positions[0][0, 0, :M].tolist() == list(range(first_position, first_position + M))
    inference, _ = tc.prefill(model, continuation, cache=cache, all_logits=True)
    tolerance = encoder_decoder_tolerance(model.config, 9 + M + 5, np.abs(training).max())
    np.testing.assert_allclose(inference, training[:, 1:], atol=tolerance, rtol=0)
    generated = tc.generate_ids(model, continuation, max_new_tokens=1, cache=cache)
    assert [tokens[0] for tokens in generated.tokens] == np.argmax(training[:, -1], axis=-1).tolist()


@nnx.jit
def _hidden_and_logits(model, ids):
    cache, valid = model.init_cache(*ids.shape), jnp.ones(ids.shape, bool)
    return model(ids, cache, valid, return_hidden=True)[0], model(ids, cache, valid)[0]


def test_the_slots_are_the_encoders_final_normed_hidden_states_of_the_context(parts):
    model, icae, _, adapters = parts
    ids = jnp.arange(1, 8)[None]
    hidden, logits = _hidden_and_logits(model, ids)
    assert hidden.shape == (1, 7, 32)
    # After the final RMSNorm: the same hidden states through the head, dot products of hidden_size terms.
    head = reordered_sum(model.config.hidden_size, np.abs(logits).max())
    np.testing.assert_allclose(model.lm_head(hidden), logits, atol=head, rtol=0)

    encoder = lora_encoder(model, adapters, scale=2.0)
    slots = slots_of(encoder, icae, ids)
    assert slots.shape == (1, M, 32)
    # Norm weight 1: unit RMS, up to RMSNorm's eps (sqrt(ms / (ms + eps)): 1e-3 for hidden states of
    # mean square 5e-3), far above float32's rounding of a mean of 32 squares.
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(slots ** 2, axis=-1)), 1.0, rtol=1e-3)
    changed = slots_of(encoder, icae, ids.at[0, 2].set(40))
    tolerance = model_tolerance(model.config, 7 + M, np.abs(slots).max())  # the encoder's, on the same context
    assert all(np.abs(changed[0, s] - slots[0, s]).max() > tolerance for s in range(M))


@nnx.jit
def _direct_losses(model, icae, context, continuation):
    """The objectives written out: the encoder (B = 0: the model) over [context, memory tokens], then
    the decoder over [slots, [AE], context] and over [slots, continuation] only."""
    n, m = context.shape[1], M
    embeds = jnp.concatenate([model.embed_tokens(context), icae.memory_embeddings[...][None]], axis=1)
    hidden, _, _ = model(jnp.zeros((1, n + m), jnp.int32), model.init_cache(1, n + m), jnp.ones((1, n + m), bool),
                         inputs_embeds=embeds, return_hidden=True)
    slots = hidden[:, n:]

    def cross_entropy(tail, targets, first):
        steps = m + tail.shape[1]
        inputs = jnp.concatenate([slots, tail], axis=1)
        logits, _, _ = model(jnp.zeros((1, steps), jnp.int32), model.init_cache(1, steps), jnp.ones((1, steps), bool),
                             inputs_embeds=inputs)
        predicting = logits[:, first:first + targets.shape[1]]
        return optax.softmax_cross_entropy_with_integer_labels(predicting, targets).mean(), jnp.abs(logits).max()

    ae_tail = jnp.concatenate([icae.ae_embedding[...][None, None], model.embed_tokens(context)], axis=1)
    (ae, ae_logits), (lm, lm_logits) = (cross_entropy(ae_tail, context, m),
                                        cross_entropy(model.embed_tokens(continuation), continuation, m - 1))
    return ae, lm, jnp.maximum(ae_logits, lm_logits)


def test_the_decoder_sees_the_context_only_through_the_slots(parts):
    model, icae, initial, _ = parts
    encoder = lora_encoder(model, initial, scale=2.0)  # B = 0: the encoder is the model
    context, continuation = jnp.arange(1, 10)[None], jnp.arange(20, 25)[None]
    losses = []
    for ctx in (context, context.at[0, 4].set(50)):
        loss, metrics = loss_of(encoder, model, icae, ctx, continuation, ae_weight=0.25)
        ae, lm, magnitude = _direct_losses(model, icae, ctx, continuation)
        # Cross-entropies (means over 9 and 5 tokens) of the logits of the encoder and then the
        # decoder, over [slots, [AE], context], written out in another order.
        logits = encoder_decoder_tolerance(model.config, M + 1 + 9, magnitude)
        tolerance = log_probability(logits, model.config.vocab_size) + reordered_sum(9, max(ae, lm))
        np.testing.assert_allclose([metrics["ae_loss"], metrics["lm_loss"]], [ae, lm], atol=tolerance, rtol=0)
        np.testing.assert_allclose(loss, 0.25 * ae + 0.75 * lm, atol=tolerance + reordered_sum(2, loss), rtol=0)
        assert {"ae_accuracy", "lm_accuracy"} <= set(metrics)
        losses.append(metrics["lm_loss"])
    # A context token reaches the continuation, through the slots: by more than the computation's error.
    assert abs(losses[0] - losses[1]) > tolerance


@nnx.jit
def _masked_oracle(encoder, decoder, icae, context, continuation):
    """500xCompressor written out: the encoder's whole cache of [context, memory tokens], then the
    decoder over the continuation with the context's slots masked out."""
    (batch, n), c = context.shape, continuation.shape[1]
    embeds = jnp.concatenate([encoder.embed_tokens(context), jnp.broadcast_to(
        icae.memory_embeddings[...], (batch, M, 32))], axis=1)
    ones = jnp.ones((batch, n + M), bool)
    hidden, cache, _ = encoder(jnp.zeros((batch, n + M), jnp.int32), encoder.init_cache(batch, n + M + c), ones,
                               inputs_embeds=embeds, return_hidden=True)
    visible = jnp.broadcast_to(jnp.arange(n + M + c) >= n, (batch, c, n + M + c))
    logits, _, _ = decoder(continuation, cache, jnp.ones((batch, c), bool), extra_mask=visible)
    return jnp.concatenate([encoder.logits(hidden, 1), logits], axis=1)


def test_kv_memory_is_the_encoders_entries_at_the_memory_tokens(parts):
    model, _, _, adapters = parts
    icae = ICAE(model, M, rngs=nnx.Rngs(0), memory="kv")
    encoder = lora_encoder(model, adapters, scale=2.0)
    context, continuation = jnp.arange(1, 10)[None].repeat(2, 0).at[1, 3].set(50), jnp.arange(20, 25)[None].repeat(2, 0)
    training = logits_of(encoder, model, icae, context, continuation)
    tolerance = encoder_decoder_tolerance(model.config, 9 + M + 5, np.abs(training).max())
    np.testing.assert_allclose(training, _masked_oracle(encoder, model, icae, context, continuation), atol=tolerance,
                               rtol=0)
    # Changes beyond the computation's error: the context reaches it, through the memory ...
    assert np.abs(training[0, 1:] - training[1, 1:]).max() > tolerance
    with_decoder_as_encoder = logits_of(model, model, icae, context, continuation)
    assert np.abs(training[:, 1:] - with_decoder_as_encoder[:, 1:]).max() > tolerance  # ... the encoder's entries


def _config(**icae):
    config = tiny_config({"task": "icae", "trainable": "none", "data.window": 24, "batch_size": 4, "steps": 5,
                          "optim.lr": 3e-2, "optim.warmup_steps": 1, "optim.weight_decay": 0.0, "lora.rank": 4})
    config.icae = ml_collections.ConfigDict({"num_slots": 4, "context_tokens": 16, "ae_weight": 0.5,
                                           "memory": "embeddings", **icae})
    return config


def test_the_task_trains_the_adapters_and_tokens_with_the_decoder_frozen():
    trainer = Trainer(_config())
    state = trainer.init_state()
    frozen = jax.device_get(trainer.frozen)
    history, losses, batch = [jax.device_get(state["trained"])], [], trainer.batch(0)
    for _ in range(5):  # on one batch: the tiny decoder is random, so that only fitting it shows in 5 steps
        state, metrics = trainer.step(state, batch)
        history.append(jax.device_get(state["trained"]))
        losses.append(float(metrics["loss"]))
    assert {"ae_loss", "lm_loss", "ae_accuracy", "lm_accuracy"} <= set(metrics)
    assert losses[-1] < losses[0] - 0.25
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer.frozen), frozen)
    jax.tree.map(np.testing.assert_array_equal, frozen, nnx.to_pure_dict(nnx.state(tc.testing.tiny_llama(
        seed=0, vocab_size=264))))
    assert all(trained["model"] == {} for trained in history)

    # Without weight decay, a parameter moves only with a gradient: the first update reaches the
    # learned tokens and each adapter's B (A's gradient is zero while B is), the next ones A too.
    before, first, last = (trained["task"] for trained in (history[0], history[1], history[-1]))
    for name in ("memory_embeddings", "ae_embedding"):
        assert np.all(first["icae"][name] != before["icae"][name])
    for layer in (0, 1):
        for proj in ("q_proj", "v_proj"):
            start, one, end = (params["lora"]["layers"][layer]["self_attn"][proj]["lora"]
                               for params in (before, first, last))
            assert not np.any(start["lora_b"]) and np.all(one["lora_b"] != 0)
            np.testing.assert_array_equal(one["lora_a"], start["lora_a"])
            assert not np.array_equal(end["lora_a"], start["lora_a"])


def test_the_kv_form_trains_without_the_autoencoding_forward():
    trainer = Trainer(_config(memory="kv", ae_weight=0.0))
    state, batch, losses = trainer.init_state(), trainer.batch(0), []
    before = jax.device_get(state["trained"]["task"]["icae"])
    for _ in range(5):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    after = jax.device_get(state["trained"]["task"]["icae"])
    assert {"lm_loss", "lm_accuracy"} <= set(metrics) and not {"ae_loss", "ae_accuracy"} & set(metrics)
    assert losses[-1] < losses[0] - 0.25
    assert np.all(after["memory_embeddings"] != before["memory_embeddings"])
    np.testing.assert_array_equal(after["ae_embedding"], before["ae_embedding"])  # no [AE] forward


@pytest.mark.parametrize("change, field", [
    ({"trainable": "lora"}, "config.trainable"),
    ({"icae": None}, "config.icae"),
    ({"icae.num_slots": 0}, "config.icae.num_slots"),
    ({"icae.context_tokens": 24}, "config.data.window"),
    ({"icae.ae_weight": 1.5}, "config.icae.ae_weight"),
    ({"icae.memory": "slots"}, "config.icae.memory"),
    ({"lora.rank": 0}, "config.lora.rank"),
    ({"lora.targets": ("q_proj", "qq_proj")}, "config.lora.targets"),
])
def test_bad_config_values_name_the_field(change, field):
    config = _config()
    for key, value in change.items():
        if value is None:
            del config[key]
        else:
            config.update_from_flattened_dict({key: value})
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check_config(config)


def test_bad_input_raises(parts):
    model, icae, _, _ = parts
    with pytest.raises(ValueError, match="num_slots"):
        ICAE(model, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="memory must be one of"):
        ICAE(model, 2, rngs=nnx.Rngs(0), memory="slots")
    with pytest.raises(ValueError, match="context_ids must be integer token ids"):
        memory_slots(model, icae, [1, 2, 3])
    with pytest.raises(ValueError, match="context_ids must be integer token ids"):
        compress_to_memory(model, model, icae, [[1.5, 2.5]])
    with pytest.raises(ValueError, match="continuation_ids has 1 rows but context_ids has 2"):
        icae_loss(model, model, icae, [[1, 2], [3, 4]], [[5, 6]])
    with pytest.raises(ValueError, match="ae_weight"):
        icae_loss(model, model, icae, [[1, 2]], [[5, 6]], ae_weight=2.0)
    with pytest.raises(ValueError, match="room"):
        compress_to_memory(model, model, icae, [[1, 2]], room=-1)
