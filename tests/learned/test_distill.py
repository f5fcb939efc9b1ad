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
from tolerances import kl_divergence, log_probability, model_tolerance, reordered_sum
from training_worker import tiny_config

CONTEXT, CONTINUATION = jnp.arange(1, 10)[None].repeat(2, 0).at[1, 3].set(40), jnp.arange(20, 25)[None].repeat(2, 0)


def full_context_logits(model, context, continuation):
    """Logits of the continuation's tokens' predictions by `tc.prefill` over the whole window."""
    logits, _ = tc.prefill(model, np.concatenate([context, continuation], axis=1), all_logits=True)
    m = continuation.shape[1]
    return np.asarray(logits[:, -m - 1:-1].astype(jnp.float32))


def full_context_logprobs(model, context, continuation):
    """Log-probabilities of the continuation's tokens' predictions by `tc.prefill` over the whole window."""
    return np.asarray(jax.nn.log_softmax(full_context_logits(model, context, continuation)))


def kl_tolerance(teacher_logits, teacher_tolerance, student_logits, student_tolerance, m):
    """Largest difference between two computations of the mean KL over the continuation's m
    predictions of `kl`, whose teacher and student logits differ by at most the tolerances given."""
    teacher_logits, student_logits = np.asarray(teacher_logits), np.asarray(student_logits)[:, -m - 1:-1]
    vocab = teacher_logits.shape[-1]
    log_ratio = np.abs(jax.nn.log_softmax(teacher_logits) - jax.nn.log_softmax(student_logits)).max()
    per_token = kl_divergence(log_probability(teacher_tolerance, vocab), log_probability(student_tolerance, vocab),
                              log_ratio, vocab)
    return per_token + reordered_sum(teacher_logits.shape[0] * m, kl(jax.nn.log_softmax(teacher_logits),
                                                                     student_logits, 0))


def cross_entropy_tolerance(logits_tolerance, value, vocab, tokens):
    """Largest difference between two computations of a mean cross-entropy `value` over `tokens`
    tokens, whose logits differ by at most `logits_tolerance`."""
    return log_probability(logits_tolerance, vocab) + reordered_sum(tokens, value)


def kl(teacher_logp, student_logits, m):
    """The mean KL of `teacher_logp` to the predictions of the continuation's m tokens in
    `student_logits` (m = 0: `student_logits` are those predictions already)."""
    student = np.asarray(jax.nn.log_softmax(student_logits[:, -m - 1:-1] if m else student_logits))
    return float(np.mean(np.sum(np.exp(teacher_logp) * (teacher_logp - student), axis=-1)))


def test_the_gist_loss_mixes_cross_entropy_and_the_kl_to_the_full_context_model(model_and_gists):
    model, gists = model_and_gists
    teacher_logits = full_context_logits(model, CONTEXT, CONTINUATION)
    student_logits = gist_logits(model, gists, CONTEXT, CONTINUATION)
    expected_kl = kl(jax.nn.log_softmax(teacher_logits), student_logits, 5)
    nll, plain = gist_loss(model, gists, CONTEXT, CONTINUATION)
    assert set(plain) == {"nll", "accuracy"} and float(plain["nll"]) == float(nll)
    loss, metrics = gist_loss(model, gists, CONTEXT, CONTINUATION, distill_weight=0.3)
    assert expected_kl > 1e-3
    # The loss's teacher is the model over the 14 tokens unpadded, `tc.prefill`'s is padded: the
    # network's bound. Its student is the same forward, with the LM head on the last 6 rows alone.
    teacher = model_tolerance(model.config, 14, np.abs(teacher_logits).max())
    student = reordered_sum(model.config.hidden_size, np.abs(student_logits).max())
    kl_bound = kl_tolerance(teacher_logits, teacher, student_logits, student, 5)
    nll_bound = cross_entropy_tolerance(0.0, nll, model.config.vocab_size, 2 * 5)  # the same logits, twice
    np.testing.assert_allclose(metrics["kl"], expected_kl, atol=kl_bound, rtol=0)
    np.testing.assert_allclose(metrics["nll"], nll, atol=nll_bound, rtol=0)
    np.testing.assert_allclose(loss, 0.7 * nll + 0.3 * expected_kl,
                               atol=0.7 * nll_bound + 0.3 * kl_bound + reordered_sum(2, loss), rtol=0)


def test_the_kl_vanishes_when_the_student_predicts_like_the_teacher():
    logits = jax.random.normal(jax.random.key(0), (2, 7, 11))
    ids = jnp.ones((2, 4), jnp.int32)
    _, metrics = continuation_objective(logits, ids, logits[:, -5:], distill_weight=1.0)
    assert float(metrics["kl"]) == 0.0  # the same log-probabilities subtract to zeros exactly
    loss, metrics = continuation_objective(logits, ids, logits[:, -5:] + jnp.arange(11.0), distill_weight=1.0)
    assert float(loss) == float(metrics["kl"]) > 0.01


def test_the_teacher_is_held_constant(model_and_gists):
    """Gradients reach the model through the student alone, with the model itself as the teacher."""
    model, gists = model_and_gists
    graphdef, state = nnx.split(model)
    teacher_logits = full_context_logits(model, CONTEXT, CONTINUATION)
    teacher = jnp.asarray(jax.nn.log_softmax(teacher_logits))

    def distilled(state):
        return gist_loss(nnx.merge(graphdef, state), gists, CONTEXT, CONTINUATION, distill_weight=1.0)[0]

    def against_constant_teacher(state):
        logits = gist_logits(nnx.merge(graphdef, state), gists, CONTEXT, CONTINUATION)
        return continuation_objective(logits, CONTINUATION, jnp.pad(teacher, ((0, 0), (0, 1), (0, 0))), 1.0)[0]

    grads, reference = jax.grad(distilled)(state), jax.grad(against_constant_teacher)(state)
    flat, flat_reference = jax.tree.leaves(grads), jax.tree.leaves(reference)
    assert max(float(jnp.abs(g).max()) for g in flat) > 1e-4
    # The gradient of the KL to the student's logits is (q - p) / 10, p the teacher's, whose
    # log-probabilities differ between the two teachers (unpadded forward, padded prefill) by
    # their tolerance, relative to p, thus to q - p where the untrained gists keep q far from p;
    # the backward pass sums the forward's lengths again (the network's bound, relative).
    teacher_error = log_probability(model_tolerance(model.config, 14, np.abs(teacher_logits).max()),
                                    model.config.vocab_size)
    relative = teacher_error + model_tolerance(model.config, 17, 1.0)
    for g, r in zip(flat, flat_reference):
        np.testing.assert_allclose(g, r, atol=relative * np.abs(np.asarray(r)).max(), rtol=0)


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
    base_logits = full_context_logits(base, context, continuation)
    to_base = kl(jax.nn.log_softmax(base_logits), student, m)
    to_adapted = kl(full_context_logprobs(adapted, context, continuation), student, m)
    # The trainer's teacher and student (jitted, LoRA unmerged) against these (prefill, merged
    # weights): each the network's bound over the window of context, gists and continuation.
    steps = n + config.gist.num_tokens + m
    tolerance = kl_tolerance(base_logits, model_tolerance(base.config, steps, np.abs(base_logits).max()), student,
                             model_tolerance(base.config, steps, np.abs(np.asarray(student)).max()), m)
    assert abs(to_base - to_adapted) > 2 * tolerance  # no value is within the tolerance of both
    np.testing.assert_allclose(metrics["kl"], to_base, atol=tolerance, rtol=0)


def test_icae_distils_the_frozen_decoder_reading_the_full_context():
    model = tc.testing.tiny_llama(seed=1)
    icae = ICAE(model, 3, rngs=nnx.Rngs(0))
    adapters = init_lora(nnx.to_pure_dict(nnx.state(model)), ("q_proj", "v_proj"), 2, jax.random.key(0))
    encoder = lora_encoder(model, jax.tree.map(lambda x: x + 0.1, adapters), scale=2.0)
    slots = memory_slots(encoder, icae, CONTEXT)
    student, _, _ = model(jnp.zeros((2, 8), jnp.int32), model.init_cache(2, 8), jnp.ones((2, 8), bool),
                          inputs_embeds=jnp.concatenate([slots, model.embed_tokens(CONTINUATION)], axis=1))
    teacher_logits = full_context_logits(model, CONTEXT, CONTINUATION)
    expected_kl = kl(jax.nn.log_softmax(teacher_logits), student, 5)
    plain_loss, plain = icae_loss(encoder, model, icae, CONTEXT, CONTINUATION, ae_weight=0.5)
    loss, metrics = icae_loss(encoder, model, icae, CONTEXT, CONTINUATION, ae_weight=0.5, distill_weight=0.75)
    # Teacher: the network's bound (unpadded forward, padded prefill); student: the encoder's layers
    # and the decoder's, written out here.
    teacher = model_tolerance(model.config, 14, np.abs(teacher_logits).max())
    student_bound = 2 * model_tolerance(model.config, 9 + 3 + 5, np.abs(np.asarray(student)).max())
    kl_bound = kl_tolerance(teacher_logits, teacher, student, student_bound, 5)
    vocab = model.config.vocab_size
    nll_bound = cross_entropy_tolerance(0.0, plain["lm_loss"], vocab, 2 * 5)  # the same logits in both calls
    ae_bound = cross_entropy_tolerance(0.0, plain["ae_loss"], vocab, 2 * 9)
    np.testing.assert_allclose(metrics["lm_kl"], expected_kl, atol=kl_bound, rtol=0)
    np.testing.assert_allclose(metrics["lm_nll"], plain["lm_loss"], atol=nll_bound, rtol=0)
    lm_bound = 0.25 * nll_bound + 0.75 * kl_bound + reordered_sum(2, metrics["lm_loss"])
    np.testing.assert_allclose(metrics["lm_loss"], 0.25 * plain["lm_nll"] + 0.75 * expected_kl, atol=lm_bound, rtol=0)
    np.testing.assert_allclose(loss, 0.5 * plain["ae_loss"] + 0.5 * metrics["lm_loss"],
                               atol=0.5 * ae_bound + reordered_sum(2, loss), rtol=0)
    assert "lm_kl" not in plain and float(plain_loss) != float(loss)


def test_a_distilled_gist_run_logs_both_terms(tmp_path):
    config = gist_config(distill_weight=0.5)
    config.steps = 3
    tc.training.train(config, str(tmp_path))
    first = tc.training.read_metrics(str(tmp_path / "metrics.jsonl"))[0]
    assert {"kl", "nll", "accuracy"} <= set(first) and first["kl"] > 0
    # The logged loss is the float32 sum of the two logged terms: its rounding alone.
    np.testing.assert_allclose(first["loss"], 0.5 * first["nll"] + 0.5 * first["kl"],
                               atol=reordered_sum(2, first["loss"]), rtol=0)


@pytest.mark.parametrize("task", ["gist", "icae"])
def test_a_distill_weight_outside_0_1_names_the_field(task):
    config = gist_config(distill_weight=1.5)
    if task == "icae":
        config = tiny_config({"task": "icae", "trainable": "none"})
        config.icae = ml_collections.ConfigDict({"num_slots": 4, "context_tokens": 16, "ae_weight": 0.5,
                                                 "distill_weight": -0.5})
    with pytest.raises(ConfigError, match=rf"config\.{task}\.distill_weight"):
        tc.training.check_config(config)
