"""Gist tokens in the model: the training forward under the gist mask and the inference cache of
k gist entries give the same continuation logits; the gists carry the context."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tokcomp_jax as tc
from tokcomp_jax.learned.gist import GistTokens, compress_to_gists, gist_logits, gist_loss, gist_press
from tolerances import log_probability, model_tolerance, reordered_sum


def test_training_forward_equals_inference_on_the_gist_cache(model_and_gists):
    model, gists = model_and_gists
    rng = np.random.default_rng(0)
    context, continuation = rng.integers(1, 64, (2, 9)), rng.integers(1, 64, (2, 5))
    training = gist_logits(model, gists, context, continuation)[:, -5:]
    cache = compress_to_gists(model, gists, context, room=5)
    assert cache.lengths.tolist() == [[[3, 3]] * 2] * 2 and cache.num_seen.tolist() == [12, 12]
    assert cache.positions[0][0, 0, :3].tolist() == [9, 10, 11]
    inference, _ = tc.prefill(model, continuation, cache=cache, all_logits=True)
    # One network over 9 + 3 + 5 tokens, summed in two orders (cached keys against the masked window).
    tolerance = model_tolerance(model.config, 9 + 3 + 5, np.abs(training).max())
    np.testing.assert_allclose(inference, training, atol=tolerance, rtol=0)


def test_gists_of_one_number_share_one_compiled_prefill(model_and_gists):
    """The learned embeddings are inputs of the compiled prefill, not part of its static press."""
    model, gists = model_and_gists
    other = GistTokens(model, 3, rngs=nnx.Rngs(1))
    two = GistTokens(model, 2, rngs=nnx.Rngs(0))
    assert gist_press(gists).press == gist_press(other).press != gist_press(two).press
    context = np.arange(1, 19).reshape(2, 9)
    mine = compress_to_gists(model, gists, context)
    compiled = tc.generation._forward_jit._cache_size()
    theirs = compress_to_gists(model, other, context)
    assert tc.generation._forward_jit._cache_size() == compiled
    assert theirs.num_seen.tolist() == [12, 12]
    # The gists themselves differ: by more than two computations of the same keys could.
    keys, their_keys = np.asarray(mine.layers[0].keys), np.asarray(theirs.layers[0].keys)
    assert np.abs(their_keys - keys).max() > model_tolerance(model.config, 12, np.abs(keys).max())


def test_generation_with_the_gist_press_continues_from_the_gists(model_and_gists):
    """`tc.generate_ids(..., press=gist_press)` on ragged prompts: each row's greedy tokens are what
    the training forward predicts from its context's gists."""
    model, gists = model_and_gists
    prompts = [list(range(3, 14)), list(range(20, 27))]
    result = tc.generate_ids(model, prompts, max_new_tokens=3, press=gist_press(gists))
    assert (result.cache.lengths == 3 + 3).all()  # the gists and the tokens decoded after them
    for prompt, tokens in zip(prompts, result.tokens):
        continuation = []
        for _ in range(3):
            context = jnp.asarray([prompt])
            follow = jnp.asarray([continuation or [0]])
            logits = gist_logits(model, gists, context, follow)[0]
            continuation.append(int(jnp.argmax(logits[len(prompt) + 3 - 1 + len(continuation)])))
        assert tokens == continuation
    with pytest.raises(ValueError, match="all_logits is not available"):
        tc.prefill(model, prompts, press=gist_press(gists), all_logits=True)


def test_the_continuation_sees_the_context_only_through_the_gists(model_and_gists):
    model, gists = model_and_gists
    context, continuation = jnp.arange(1, 10)[None], jnp.arange(20, 25)[None]
    logits = gist_logits(model, gists, context, continuation)
    changed = gist_logits(model, gists, context.at[0, 2].set(40), continuation)
    # A change is one beyond what summing the same network in another order could make.
    tolerance = model_tolerance(model.config, 17, np.abs(logits).max())
    assert np.abs(logits[:, -5:] - changed[:, -5:]).max() > tolerance  # through the gists' KV
    # Without the gist mask (plain causal), the continuation's logits would differ from the gist cache's.
    ids = jnp.concatenate([context, jnp.zeros((1, 3), jnp.int32), continuation], axis=1)
    embeds = model.embed_tokens(ids).at[0, 9:12].set(gists.embeddings[...])
    plain, _, _ = model(ids, model.init_cache(1, 17), jnp.ones((1, 17), bool), inputs_embeds=embeds)
    assert np.abs(plain[:, -5:] - logits[:, -5:]).max() > tolerance


def test_the_loss_trains_the_gists(model_and_gists):
    model, gists = model_and_gists
    context, continuation = jnp.arange(1, 10)[None], jnp.arange(20, 25)[None]
    grads = nnx.grad(lambda g: gist_loss(model, g, context, continuation)[0])(gists)
    assert float(jnp.abs(grads.embeddings[...]).sum()) > 0
    logits = gist_logits(model, gists, context, continuation)
    logp = jax.nn.log_softmax(logits[0, 11:16])
    expected = -np.mean([logp[i, int(t)] for i, t in enumerate(continuation[0])])
    # The same hidden states; the loss's LM head runs on its last 6 rows alone (dot products of
    # hidden_size terms, maybe summed in another order), then a log-softmax and a mean of 5.
    head = reordered_sum(model.config.hidden_size, np.abs(logits).max())
    tolerance = log_probability(head, model.config.vocab_size) + reordered_sum(5, expected)
    np.testing.assert_allclose(gist_loss(model, gists, context, continuation)[0], expected, atol=tolerance, rtol=0)


def test_bad_input_raises():
    model = tc.testing.tiny_llama()
    with pytest.raises(ValueError, match="num_tokens"):
        GistTokens(model, 0, rngs=nnx.Rngs(0))
    gists = GistTokens(model, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="context_ids must be integer token ids"):
        compress_to_gists(model, gists, [1.5, 2.5])
    with pytest.raises(ValueError, match="room"):
        compress_to_gists(model, gists, [[1, 2]], room=-1)
