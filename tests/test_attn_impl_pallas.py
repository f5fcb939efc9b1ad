"""attn_impl="pallas": the model and the presses on the Pallas kernels (interpret mode on CPU)
give what the XLA reference gives."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tokcomp_jax as tc
from conftest import essay
from tokcomp_jax.presses import a2sf, adakv, h2o, knorm, snapkv, tova
from tokcomp_jax.presses.base import Press
from tolerances import attention_mass_tolerance, model_tolerance, score_magnitude

TINY = dict(head_dim=32, num_heads=6, num_kv_heads=2)  # GQA ratio 3; the kernels take head dims from 32


def _pair():
    return tc.testing.tiny_llama(**TINY), tc.testing.tiny_llama(attn_impl="pallas", **TINY)


def test_prefill_and_decode_logits_match_the_reference():
    """Ragged rows, several chunks (padding at the front), then decoding steps: the kernels sum
    attention in other orders than XLA, `model_tolerance` over the 24 tokens."""
    reference, pallas = _pair()
    prompts = [list(range(3, 24)), list(range(30, 43))]
    outputs = []
    for model in (reference, pallas):
        logits, cache = tc.prefill(model, prompts, capacity=28, chunk_size=8, all_logits=True)
        steps = []
        for token in ([5, 6], [7, 8], [9, 10]):
            step_logits, cache = tc.decode(model, jnp.asarray(token), cache)
            steps.append(step_logits)
        outputs.append((logits, jnp.stack(steps)))
    for ours, theirs in zip(outputs[1], outputs[0]):
        tolerance = model_tolerance(reference.config, 24, np.abs(np.asarray(theirs)).max())
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=tolerance)


@pytest.mark.parametrize("press", [None, snapkv(0.5, window_size=4), h2o(0.5), tova(0.5), a2sf(0.5),
                                   adakv(snapkv(0.5, window_size=4)), knorm(0.5)],
                         ids=["none", "snapkv", "h2o", "tova", "a2sf", "adakv_snapkv", "knorm"])
def test_generation_with_a_press_matches_the_reference(press):
    """Same kept entries and the same greedy tokens; adakv decodes over a ragged (per-head) cache."""
    prompts = [list(range(2, 40)), list(range(10, 31))]
    results = [tc.generate_ids(model, prompts, max_new_tokens=6, press=press, chunk_size=16) for model in _pair()]
    assert results[1].tokens == results[0].tokens
    for ours, theirs in zip(results[1].cache.layers, results[0].cache.layers):
        np.testing.assert_array_equal(ours.lengths, theirs.lengths)
        np.testing.assert_array_equal(ours.head_positions(), theirs.head_positions())


def test_a_decoding_step_emits_each_entrys_attention_for_the_press():
    """A press applied at a Pallas decode step gets the kernel's per-entry probabilities, which equal
    the reference's attention of the last query summed over its group, up to
    `attention_mass_tolerance` over the 24 slots and the 3 query heads of a group. Each query
    head's probabilities sum to 1: against that exact sum only the kernel carries error, half the
    bound over all 24 * 3 probabilities."""
    model = tc.testing.tiny_llama(attn_impl="pallas", **TINY)
    _, cache = tc.prefill(model, [list(range(3, 20)), list(range(5, 14))], capacity=24)

    def record(layer, obs, state, **extra):
        return layer, (obs.attention.key_probs, tc.attention.attention_mass(
            layer, obs.queries, obs.positions, jnp.ones((2, 1)), backend=tc.attention.XLA), obs.queries, layer.keys)

    spy = Press(init=lambda layer, index: None, compress=record)
    _, _, states = model(jnp.asarray([[4], [6]]), cache, jnp.ones((2, 1), bool), all_logits=False, press=spy)
    for emitted, reference, queries, keys in states:
        assert emitted.shape == reference.shape == (2, 2, 24)
        head_dim = keys.shape[-1]
        scores = score_magnitude(queries, np.asarray(keys).reshape(2, -1, head_dim), head_dim ** -0.5)
        tolerance = attention_mass_tolerance(24, head_dim, 3, np.abs(np.asarray(reference)).max(), scores)
        np.testing.assert_allclose(emitted, reference, rtol=0, atol=tolerance)
        sum_tolerance = attention_mass_tolerance(24, head_dim, 24 * 3, 3.0, scores) / 2
        np.testing.assert_allclose(emitted.sum(-1), 3.0, rtol=0, atol=sum_tolerance)  # 3 query heads, each 1


def test_tova_while_decoding_matches_the_reference():
    prompts = [list(range(2, 30))]
    press = tova(tokens=10)
    results = [tc.generate_ids(model, prompts, max_new_tokens=9, decoding_press=press, compress_every=4)
               for model in _pair()]
    assert results[1].tokens == results[0].tokens
    np.testing.assert_array_equal(results[1].cache.positions[0], results[0].cache.positions[0])


def test_bad_attention_options_raise_before_compiling():
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        tc.testing.tiny_llama(attn_impl="flash")
    with pytest.raises(ValueError, match="sliding window"):
        tc.testing.tiny_llama(attn_impl="pallas", sliding_window=4, **TINY)
    model = tc.testing.tiny_llama(attn_impl="pallas")  # head dim 8
    with pytest.raises(ValueError, match="head dim 8 is not supported.*attn_impl='xla'"):
        tc.prefill(model, [[1, 2, 3]])


def test_a_mask_the_kernels_do_not_take_raises_instead_of_falling_back():
    """An extra per-slot mask (e.g. the gist mask) is served by the XLA backend and refused by Pallas,
    with an error naming the backend; nothing falls back silently to another backend. Unmasked
    tokens may differ by `model_tolerance` (two compiled programs), masked ones by far more."""
    ids = jnp.asarray([[3, 4, 5, 6]])
    hide_first = jnp.ones((1, 4, 4), bool).at[:, 2:, 0].set(False)  # tokens 2, 3 do not see slot 0
    xla = tc.testing.tiny_llama(**TINY)
    masked, _, _ = xla(ids, xla.init_cache(1, 4), jnp.ones((1, 4), bool), extra_mask=hide_first)
    plain, _, _ = xla(ids, xla.init_cache(1, 4), jnp.ones((1, 4), bool))
    tolerance = model_tolerance(xla.config, 4, np.abs(np.asarray(plain)).max())
    np.testing.assert_allclose(masked[:, :2], plain[:, :2], rtol=0, atol=tolerance)
    assert np.abs(np.asarray(masked[:, 2:]) - np.asarray(plain[:, 2:])).max() > tolerance
    pallas = tc.testing.tiny_llama(attn_impl="pallas", **TINY)
    with pytest.raises(ValueError, match="'pallas' attention backend takes no extra mask.*attn_impl='xla'"):
        pallas(ids, pallas.init_cache(1, 4), jnp.ones((1, 4), bool), extra_mask=hide_first)


def test_backends_are_registered_in_one_place():
    assert tc.attention.backend_names() == ("xla", "pallas")
    assert tc.attention.get_backend("pallas") is tc.attention.PALLAS
    with pytest.raises(TypeError, match="AttentionBackend"):
        tc.attention.register_backend("flash")


@pytest.mark.slow(reason="the real 30-layer model through the Pallas kernels in interpret mode (Python per grid step)")
def test_smollm2_generates_the_same_greedy_tokens_with_pallas(smollm2):
    """The real model, a real prompt: with and without a press."""
    model, tokenizer = smollm2
    pallas = nnx.merge(*nnx.split(model))
    pallas.attn_impl = "pallas"
    context = " ".join(essay().split()[:120])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": context + "\n\nSummarise this in one line."}])
    ids = [tokenizer.encode(prompt, add_special_tokens=False)]
    for press in (None, snapkv(0.5, window_size=16)):
        expected, got = (tc.generate_ids(m, ids, max_new_tokens=10, press=press).tokens for m in (model, pallas))
        assert len(expected[0]) == 10, tokenizer.decode(expected[0])
        assert got == expected, (press, tokenizer.decode(got[0]), tokenizer.decode(expected[0]))
    assert len(jax.tree.leaves(nnx.state(pallas))) == len(jax.tree.leaves(nnx.state(model)))
