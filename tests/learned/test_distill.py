"""Context distillation (Snell et al., 2022) in the learned compressors' losses: the KL of the
compressed form's next-token distributions to those of the model reading the full context, with the
teacher's side held constant."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import tokcomp_jax as tc
from tokcomp_jax.learned.distill import continuation_objective
from tokcomp_jax.learned.gist import GistTokens, gist_logits, gist_loss
from tokcomp_jax.learned.icae import ICAE, icae_loss, lora_encoder, memory_slots
from tokcomp_jax.training import ConfigError, init_lora
from tokcomp_jax.training.lora import merge_lora
from tokcomp_jax.training.loop import load_model
from test_learned_tasks import gist_config
from training_worker import tiny_config

CONTEXT, CONTINUATION = jnp.arange(1, 10)[None].repeat(2, 0).at[1, 3].set(40), jnp.arange(20, 25)[None].repeat(2, 0)


def full_context_logprobs(model, context, continuation):
    """Log-probabilities of the continuation's tokens' predictions by `tc.prefill` over the whole window."""
    logits, _ = tc.prefill(model, np.concatenate([context, continuation], axis=1), all_logits=True)
    m = continuation.shape[1]
    return np.asarray(jax.nn.log_softmax(logits[:, -m - 1:-1].astype(jnp.float32)))


def kl(teacher_logp, student_logits, m):
    student = np.asarray(jax.nn.log_softmax(student_logits[:, -m - 1:-1]))
    return float(np.mean(np.sum(np.exp(teacher_logp) * (teacher_logp - student), axis=-1)))


def test_the_gist_loss_mixes_cross_entropy_and_the_kl_to_the_full_context_model(model_and_gists):
    model, gists = model_and_gists
    teacher = full_context_logprobs(model, CONTEXT, CONTINUATION)
    expected_kl = kl(teacher, gist_logits(model, gists, CONTEXT, CONTINUATION), 5)
    nll, plain = gist_loss(model, gists, CONTEXT, CONTINUATION)
    assert set(plain) == {"nll", "accuracy"} and float(plain["nll"]) == float(nll)
    loss, metrics = gist_loss(model, gists, CONTEXT, CONTINUATION, distill_weight=0.3)
    assert expected_kl > 1e-3
    np.testing.assert_allclose(metrics["kl"], expected_kl, rtol=1e-4)
    np.testing.assert_allclose(metrics["nll"], nll, rtol=1e-6)
    np.testing.assert_allclose(loss, 0.7 * nll + 0.3 * expected_kl, rtol=1e-5)


def test_the_kl_vanishes_when_the_student_predicts_like_the_teacher():
    logits = jax.random.normal(jax.random.key(0), (2, 7, 11))
    ids = jnp.ones((2, 4), jnp.int32)
    _, metrics = continuation_objective(logits, ids, logits[:, -5:], distill_weight=1.0)
    np.testing.assert_allclose(metrics["kl"], 0.0, atol=1e-6)
    loss, metrics = continuation_objective(logits, ids, logits[:, -5:] + jnp.arange(11.0), distill_weight=1.0)
    assert float(loss) == float(metrics["kl"]) > 0.01


def test_the_teacher_is_held_constant(model_and_gists):
    """Gradients reach the model through the student alone, with the model itself as the teacher."""
    model, gists = model_and_gists
    graphdef, state = nnx.split(model)
    teacher = jnp.asarray(full_context_logprobs(model, CONTEXT, CONTINUATION))

    def distilled(state):
        return gist_loss(nnx.merge(graphdef, state), gists, CONTEXT, CONTINUATION, distill_weight=1.0)[0]

    def against_constant_teacher(state):
        logits = gist_logits(nnx.merge(graphdef, state), gists, CONTEXT, CONTINUATION)
        return continuation_objective(logits, CONTINUATION, jnp.pad(teacher, ((0, 0), (0, 1), (0, 0))), 1.0)[0]

    grads, reference = jax.grad(distilled)(state), jax.grad(against_constant_teacher)(state)
    flat, flat_reference = jax.tree.leaves(grads), jax.tree.leaves(reference)
    assert max(float(jnp.abs(g).max()) for g in flat) > 1e-4
    for g, r in zip(flat, flat_reference):
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_trained_gists_distil_the_base_model_not_the_trained_one(trainable):
    """The teacher is the model as loaded. A teacher with the trained weights drifts with them, and
    with distillation alone both collapse onto one constant output (KL 0, the continuation lost)."""
    config = gist_config(distill_weight=1.0)
    config.trainable = trainable
    trainer = tc.training.Trainer(config)
    trained = jax.tree.map(lambda x: x + 0.05, trainer.init_state()["trained"])  # adapters away from B = 0
    batch = trainer.batch(0)
    _, metrics = trainer.loss_fn(trained, trainer.frozen, batch)

    base, _ = load_model(config)
    graphdef, params = nnx.split(base)
    assert jax.tree.all(jax.tree.map(np.array_equal, nnx.to_pure_dict(params), trainer.frozen))
    adapted = nnx.merge(graphdef, trained["model"] if trainable == "full" else
                        merge_lora(trainer.frozen, trained["model"], config.lora.alpha / config.lora.rank))
    gists = GistTokens(base, config.gist.num_tokens, rngs=nnx.Rngs(0))
    gists.embeddings.value = trained["task"]["embeddings"]
    n = config.gist.context_tokens
    context, continuation = np.asarray(batch["ids"][:, :n]), np.asarray(batch["ids"][:, n:])
    student = gist_logits(adapted, gists, context, continuation)
    m = continuation.shape[1]
    to_base = kl(full_context_logprobs(base, context, continuation), student, m)
    to_adapted = kl(full_context_logprobs(adapted, context, continuation), student, m)
    assert abs(to_base - to_adapted) > 0.05 * to_base
    np.testing.assert_allclose(metrics["kl"], to_base, rtol=1e-4)


def test_icae_distils_the_frozen_decoder_reading_the_full_context():
    model = tc.testing.tiny_llama(seed=1)
    icae = ICAE(model, 3, rngs=nnx.Rngs(0))
    adapters = init_lora(nnx.to_pure_dict(nnx.state(model)), ("q_proj", "v_proj"), 2, jax.random.key(0))
    encoder = lora_encoder(model, jax.tree.map(lambda x: x + 0.1, adapters), scale=2.0)
    slots = memory_slots(encoder, icae, CONTEXT)
    student, _, _ = model(jnp.zeros((2, 8), jnp.int32), model.init_cache(2, 8), jnp.ones((2, 8), bool),
                          inputs_embeds=jnp.concatenate([slots, model.embed_tokens(CONTINUATION)], axis=1))
    expected_kl = kl(full_context_logprobs(model, CONTEXT, CONTINUATION), student, 5)
    plain_loss, plain = icae_loss(encoder, model, icae, CONTEXT, CONTINUATION, ae_weight=0.5)
    loss, metrics = icae_loss(encoder, model, icae, CONTEXT, CONTINUATION, ae_weight=0.5, distill_weight=0.75)
    np.testing.assert_allclose(metrics["lm_kl"], expected_kl, rtol=1e-4)
    np.testing.assert_allclose(metrics["lm_nll"], plain["lm_loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["lm_loss"], 0.25 * plain["lm_nll"] + 0.75 * expected_kl, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.5 * plain["ae_loss"] + 0.5 * metrics["lm_loss"], rtol=1e-5)
    assert "lm_kl" not in plain and float(plain_loss) != float(loss)


def test_a_distilled_gist_run_logs_both_terms(tmp_path):
    config = gist_config(distill_weight=0.5)
    config.steps = 3
    tc.training.train(config, str(tmp_path))
    first = tc.training.read_metrics(str(tmp_path / "metrics.jsonl"))[0]
    assert {"kl", "nll", "accuracy"} <= set(first) and first["kl"] > 0
    np.testing.assert_allclose(first["loss"], 0.5 * first["nll"] + 0.5 * first["kl"], rtol=1e-5)


@pytest.mark.parametrize("task", ["gist", "icae"])
def test_a_distill_weight_outside_0_1_names_the_field(task):
    config = gist_config(distill_weight=1.5)
    if task == "icae":
        config = tiny_config({"task": "icae", "trainable": "none"})
        config.icae = ml_collections.ConfigDict({"num_slots": 4, "context_tokens": 16, "ae_weight": 0.5,
                                                 "distill_weight": -0.5})
    with pytest.raises(ConfigError, match=rf"config\.{task}\.distill_weight"):
        tc.training.check_config(config)
