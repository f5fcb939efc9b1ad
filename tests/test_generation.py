"""Prefill, decode, the KV cache and sampling on a tiny random model, against a dense oracle:
the model run once over each row's whole sequence."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tokcomp_jax as tc
from tokcomp_jax.checkpoints import resolve_model_path
from tokcomp_jax.checkpoints.gguf import GGUFFile
from tokcomp_jax.sampling import SamplingConfig, sample
from tolerances import attention_tolerance, binomial, model_tolerance, score_magnitude


@pytest.fixture(scope="module")
def model():
    return tc.testing.tiny_llama(seed=1)


def _full_logits(model, ids):
    logits, _ = tc.prefill(model, [ids], all_logits=True)
    return np.asarray(logits[0])


def test_cached_decode_equals_full_forward_over_32_steps(model):
    """Cached decode and a full forward sum each layer in other orders: `model_tolerance`."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 64, n).tolist() for n in (5, 11, 1)]
    continuation = rng.integers(0, 64, (3, 33)).tolist()
    logits, cache = tc.prefill(model, prompts, capacity=48)
    steps = [np.asarray(logits)]
    for t in range(32):
        logits, cache = tc.decode(model, [row[t] for row in continuation], cache)
        steps.append(np.asarray(logits))
    steps = np.stack(steps, axis=1)  # [B, 33, V]
    for row, prompt in enumerate(prompts):
        full = _full_logits(model, prompt + continuation[row][:32])
        tolerance = model_tolerance(model.config, len(full), np.abs(full).max())
        np.testing.assert_allclose(steps[row], full[len(prompt) - 1:], atol=tolerance, rtol=0)
    assert cache.num_seen.tolist() == [len(p) + 32 for p in prompts]
    assert np.asarray(cache.lengths)[:, :, 0].tolist() == [[len(p) + 32 for p in prompts]] * 2


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 16])
def test_chunked_prefill_equals_one_shot(model, chunk_size):
    """Chunked and one-shot prefill sum attention (and pad the batch) in other orders: logits, keys
    and values within `model_tolerance` of their magnitude."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 64, n).tolist() for n in (13, 7, 16)]
    one_logits, one_cache = tc.prefill(model, prompts, all_logits=True, chunk_size=512)
    logits, cache = tc.prefill(model, prompts, all_logits=True, chunk_size=chunk_size)
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        np.testing.assert_allclose(logits[row, :n], one_logits[row, :n], rtol=0,
                                   atol=model_tolerance(model.config, n, np.abs(one_logits[row, :n]).max()))
        for layer, one_layer in zip(cache.layers, one_cache.layers):
            for got, want in ((layer.keys, one_layer.keys), (layer.values, one_layer.values)):
                want = np.asarray(want[row, :, :n])
                np.testing.assert_allclose(got[row, :, :n], want, rtol=0,
                                           atol=model_tolerance(model.config, n, np.abs(want).max()))
            assert layer.positions[row, :, :n].tolist() == [list(range(n))] * 2
            assert layer.lengths[row].tolist() == [n, n]
    last, _ = tc.prefill(model, prompts, chunk_size=chunk_size)
    want = np.asarray([one_logits[r, len(p) - 1] for r, p in enumerate(prompts)])
    np.testing.assert_allclose(last, want, rtol=0,
                               atol=model_tolerance(model.config, max(map(len, prompts)), np.abs(want).max()))


def test_prefill_continues_a_filled_cache(model):
    """Prefill on top of a cache (e.g. a question after a context) equals prefilling both at once,
    up to `model_tolerance` (other orders of the attention sums)."""
    context, question = list(range(10)), [20, 21, 22, 23]
    _, cache = tc.prefill(model, [context], capacity=16)
    logits, cache = tc.prefill(model, [question], cache=cache, all_logits=True)
    full = _full_logits(model, context + question)[10:]
    np.testing.assert_allclose(logits[0], full, rtol=0, atol=model_tolerance(model.config, 14, np.abs(full).max()))
    assert cache.positions[0][0, 0, :14].tolist() == list(range(14))


def test_gqa_ratios_and_sliding_window_against_dense_oracle():
    """Single-head reference attention written with explicit loops (group size 1, 2 and 4), in
    float32 numpy: `attention_tolerance` over the 6 keys."""
    for heads, kv_heads, window in [(4, 4, None), (4, 2, None), (4, 1, 3)]:
        rng = np.random.default_rng(0)
        q = rng.normal(size=(1, 6, heads, 8)).astype(np.float32)
        layer = tc.LayerCache.empty(1, kv_heads, 8, 8).append(
            jnp.asarray(rng.normal(size=(1, kv_heads, 6, 8)), jnp.float32),
            jnp.asarray(rng.normal(size=(1, kv_heads, 6, 8)), jnp.float32),
            jnp.arange(6)[None], jnp.ones((1, 6), bool))
        out = tc.attention.attend(jnp.asarray(q), layer, jnp.arange(6)[None], sliding_window=window)
        keys, values = np.asarray(layer.keys[0]), np.asarray(layer.values[0])
        for t in range(6):
            for h in range(heads):
                kv = h // (heads // kv_heads)
                visible = [s for s in range(6) if s <= t and (window is None or s > t - window)]
                scores = keys[kv, visible] @ q[0, t, h] / np.sqrt(8)
                probs = np.exp(scores - scores.max())
                expected = (probs / probs.sum()) @ values[kv, visible]
                tolerance = attention_tolerance(len(visible), 8, np.abs(values[kv, visible]).max(),
                                                score_magnitude(q[None, 0, t, h], keys[None, kv], 8 ** -0.5))
                np.testing.assert_allclose(out[0, t, h], expected, rtol=0, atol=tolerance)


def test_layer_cache_append_is_ragged_per_head_and_drops_overflow():
    layer = tc.LayerCache.empty(batch=1, num_kv_heads=2, capacity=4, head_dim=1)
    layer = dataclasses.replace(layer, lengths=jnp.array([[1, 3]], jnp.int32))
    new = jnp.array([[[[10.], [11.]], [[20.], [21.]]]])  # [B=1, Hkv=2, T=2, D=1]
    layer = layer.append(new, new, jnp.array([[7, 8]]), jnp.array([[True, True]]))
    assert layer.keys[0, 0, :, 0].tolist() == [0, 10, 11, 0]
    assert layer.keys[0, 1, :, 0].tolist() == [0, 0, 0, 20]  # the 5th entry of head 1 is dropped
    assert layer.positions[0].tolist() == [[-1, 7, 8, -1], [-1, -1, -1, 7]]
    assert layer.lengths.tolist() == [[3, 5]]
    # Only valid tokens are written, compacted after the last entry (here the first is padding).
    layer = tc.LayerCache.empty(batch=1, num_kv_heads=2, capacity=4, head_dim=1)
    layer = layer.append(new, new, jnp.array([[0, 5]]), jnp.array([[False, True]]))
    assert layer.keys[0, :, :, 0].tolist() == [[11, 0, 0, 0], [21, 0, 0, 0]]
    assert layer.positions[0, 0].tolist() == [5, -1, -1, -1] and layer.lengths.tolist() == [[1, 1]]


def test_kv_cache_is_a_pytree_that_jits_and_vmaps():
    cache = tc.KVCache.empty(num_layers=3, batch=2, num_kv_heads=2, capacity=[8, 4, 2], head_dim=4)
    doubled = jax.jit(lambda c: jax.tree.map(lambda x: x * 2, c))(cache)
    assert isinstance(doubled, tc.KVCache) and doubled.capacities == (8, 4, 2)
    per_row = jax.vmap(lambda c: c.nbytes and c.layers[0].keys.sum())(cache)
    assert per_row.shape == (2,)
    expected = sum(2 * 2 * c * 4 * 4 * 2 + 2 * 2 * c * 4 + 2 * 2 * 4 for c in (8, 4, 2)) + 2 * 4
    assert cache.nbytes == expected
    assert cache.lengths.shape == (3, 2, 2)


def test_prompt_longer_than_cache_and_full_cache_are_rejected(model):
    with pytest.raises(ValueError, match="capacity is 3"):
        tc.prefill(model, [[1, 2, 3, 4, 5]], capacity=3)
    _, cache = tc.prefill(model, [[1, 2, 3]], capacity=4)
    _, cache = tc.decode(model, [4], cache)
    with pytest.raises(ValueError, match="cache is full"):
        tc.decode(model, [5], cache)
    with pytest.raises(ValueError, match="cache is full"):
        tc.prefill(model, [[1, 2]], cache=cache)


@pytest.mark.parametrize("bad, message", [
    ([], "non-empty"), ([[0.5, 1.5]], "integer"), (np.zeros((2, 3, 4), np.int32), "shaped"),
    ([[1, 64]], r"\[0, 64\)"), ([[-1, 2]], r"\[0, 64\)"),
])
def test_bad_ids_are_rejected(model, bad, message):
    with pytest.raises(ValueError, match=message):
        tc.prefill(model, bad)


@pytest.mark.parametrize("press_name", ["snapkv", "pyramidkv", "adakv_snapkv", "streaming_llm"])
def test_slot_quantum_shares_shapes_across_prompt_lengths_and_keeps_the_same_entries(model, press_name):
    """Prompts of 37 and 45 tokens with 5 free slots asked: rounded to 16 slots, both compress into
    caches of one shape, with room for the 5 tokens, holding the entries kept without rounding."""
    press = tc.presses.make_press(press_name, 0.5, model)
    rng = np.random.default_rng(0)
    shapes = set()
    for length in (37, 45):
        ids = rng.integers(0, 64, (2, length))
        _, exact = tc.prefill(model, ids, lengths=[length, length - 4], capacity=length + 5, press=press)
        _, rounded = tc.prefill(model, ids, lengths=[length, length - 4], capacity=length + 5, press=press,
                                slot_quantum=16)
        shapes.add(tuple(layer.keys.shape for layer in rounded.layers))
        for a, b in zip(exact.layers, rounded.layers):
            np.testing.assert_array_equal(a.lengths, b.lengths)
            assert isinstance(a, tc.RaggedLayerCache) == isinstance(b, tc.RaggedLayerCache)
            kept = lambda layer: sorted(np.asarray(layer.positions)[np.asarray(layer.positions) >= 0].tolist())
            assert kept(a) == kept(b)
        assert int(rounded.free_slots().min()) >= 5
    assert len(shapes) == 1
    with pytest.raises(ValueError, match="slot_quantum must be a whole number of slots >= 1"):
        tc.prefill(model, [[1, 2]], slot_quantum=0)


def test_bad_lengths_are_rejected(model):
    with pytest.raises(ValueError, match="lengths"):
        tc.prefill(model, np.ones((2, 4), np.int32), lengths=[0, 4])


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.3, 0.15]] * 4000))
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    greedy = sample(logits, keys[0], SamplingConfig())
    assert set(greedy.tolist()) == {1}
    # Frequencies of 4000 draws: `binomial` (6 standard deviations) around each probability; a
    # filtered-out token (probability 0) must never be drawn.
    def assert_frequencies(freq, probabilities):
        for f, p in zip(freq, probabilities):
            assert abs(f - p) <= binomial(4000, p), (freq, probabilities)

    freq = np.bincount(sample(logits, keys[0], SamplingConfig(temperature=1.0)), minlength=4) / 4000
    assert_frequencies(freq, [0.05, 0.5, 0.3, 0.15])
    top2 = np.bincount(sample(logits, keys[1], SamplingConfig(temperature=1.0, top_k=2)), minlength=4) / 4000
    assert_frequencies(top2, [0, 0.5 / 0.8, 0.3 / 0.8, 0])
    # top_p=0.7: the nucleus is {0.5, 0.3} (0.5 alone is short of 0.7).
    nucleus = np.bincount(sample(logits, keys[1], SamplingConfig(temperature=1.0, top_p=0.7)), minlength=4) / 4000
    assert_frequencies(nucleus, [0, 0.5 / 0.8, 0.3 / 0.8, 0])
    assert set(sample(logits, keys[1], SamplingConfig(temperature=1.0, top_p=0.4)).tolist()) == {1}
    for bad in (dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingConfig(**bad)


def test_generate_ids_batched_equals_one_row_at_a_time_and_stops(model):
    prompts = [[3, 4, 5, 6, 7], [9, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    batched = tc.generate_ids(model, prompts, max_new_tokens=12).tokens
    for prompt, row in zip(prompts, batched):
        assert tc.generate_ids(model, [prompt], max_new_tokens=12).tokens[0] == row
    stop = batched[0][3]
    stopped = tc.generate_ids(model, prompts, max_new_tokens=12, stop_ids=[stop]).tokens
    for full, cut in zip(batched, stopped):
        expected = full[:full.index(stop)] if stop in full else full
        assert cut == expected
    sampled = [tc.generate_ids(model, prompts, max_new_tokens=8, seed=s,
                               sampling=SamplingConfig(temperature=1.0)).tokens for s in (0, 0, 1)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_prompts_past_the_context_raise_before_compiling_or_keep_their_last_tokens():
    """A 64-position model: 60 prompt tokens and 8 new ones do not fit. Nothing compiles before the
    error; truncate_left=True generates what the prompt's last 56 tokens give when passed directly."""
    model = tc.testing.tiny_llama(seed=2, max_position_embeddings=64)
    rng = np.random.default_rng(0)
    long, short = rng.integers(0, 64, 60).tolist(), rng.integers(0, 64, 20).tolist()
    compiled = tc.generation._forward_jit._cache_size()
    with pytest.raises(ValueError, match=r"prompt \(60 tokens\) and max_new_tokens \(8\) needs 68 positions but the "
                                         r"model's context is 64 .* truncate_left=True to keep each prompt's last 56"):
        tc.generate_ids(model, [long, short], max_new_tokens=8)
    with pytest.raises(ValueError, match=r"the prompt \(70 tokens\) needs 70 positions .* context is 64"):
        tc.prefill(model, [list(range(60)) + list(range(10))])
    assert tc.generation._forward_jit._cache_size() == compiled
    with pytest.warns(UserWarning, match="each prompt keeps its last 56 tokens"):
        truncated = tc.generate_ids(model, [long, short], max_new_tokens=8, truncate_left=True)
    assert truncated.tokens == tc.generate_ids(model, [long[-56:], short], max_new_tokens=8).tokens
    assert truncated.prompt_lengths == [56, 20]
    with pytest.raises(ValueError, match=r"max_new_tokens \(64\) needs 124 .* lower max_new_tokens\.$"):
        tc.generate_ids(model, [long], max_new_tokens=64, truncate_left=True)  # nothing of the prompt would fit
    # A cache continued past the context: the positions it has seen count.
    _, cache = tc.prefill(model, [long], capacity=64)
    with pytest.raises(ValueError, match=r"the prompt \(8 tokens after the cache's 60\) needs 68 positions"):
        tc.prefill(model, [short[:8]], cache=cache)
    _, cache = tc.prefill(model, [list(range(60))], cache=model.init_cache(1, 64))
    for token in range(4):
        _, cache = tc.decode(model, [token], cache)
    with pytest.raises(ValueError, match="one more token needs 65 positions but the model's context is 64"):
        tc.decode(model, [1], cache)


def test_generate_on_a_prompt_past_the_context_raises_before_compiling_or_truncates_like_the_cut_prompt():
    """tc.generate with SmolLM2's tokenizer on a random model of a 64-position context."""
    tokenizer = tc.Tokenizer.from_gguf(GGUFFile(resolve_model_path("smollm2-135m-instruct")))
    model = tc.testing.tiny_llama(seed=4, vocab_size=tokenizer.vocab_size, max_position_embeddings=64)
    prompt = " ".join(f"word{i}" for i in range(40))
    ids = tokenizer.encode(prompt)
    assert len(ids) + 6 > 64
    compiled = tc.generation._forward_jit._cache_size()
    with pytest.raises(ValueError, match=rf"the prompt \({len(ids)} tokens\) and max_new_tokens \(6\) needs"):
        tc.generate(model, tokenizer, prompt, max_new_tokens=6, chat=False)
    assert tc.generation._forward_jit._cache_size() == compiled
    with pytest.warns(UserWarning, match="each prompt keeps its last 58 tokens"):
        text = tc.generate(model, tokenizer, prompt, max_new_tokens=6, chat=False, truncate_left=True)
    direct = tc.generate_ids(model, [ids[-58:]], max_new_tokens=6, stop_ids=tokenizer.eos_ids,
                             pad_id=tokenizer.pad_id).tokens[0]
    assert text == tokenizer.decode(direct) and len(direct) == 6


@pytest.mark.parametrize("tokens, message", [
    ([64], r"ids must be token ids in \[0, 64\), got values in \[64, 64\]"),
    ([-1], r"ids must be token ids in \[0, 64\), got values in \[-1, -1\]"),
    ([1.5], r"tokens must be one integer token id per row of the cache, shaped \[1\]; got shape \(1,\) and dtype "
            "float"),
    ([[1, 2]], r"tokens must be one integer token id per row .* got shape \(1, 2\)"),
])
def test_decode_rejects_tokens_prefill_would_reject(model, tokens, message):
    _, cache = tc.prefill(model, [[1, 2, 3]], capacity=8)
    with pytest.raises(ValueError, match=message):
        tc.decode(model, tokens, cache)


def test_streaming_yields_the_same_text(smollm2):
    model, tokenizer = smollm2
    pieces = []
    text = tc.generate(model, tokenizer, "Name three colors.", max_new_tokens=12,
                       stream=lambda row, piece: pieces.append(piece))
    assert "".join(pieces) == text and len(pieces) > 1


def test_bfloat16_model_predicts_like_float32(smollm2):
    model, tokenizer = tc.load("smollm2-135m-instruct", dtype="bfloat16")
    assert model.embed_tokens.embedding.get_value().dtype == jnp.bfloat16
    ids = tc.generation.encode_prompts(tokenizer, ["What is the capital of France?"], chat=True)
    logits, cache = tc.prefill(model, ids)
    reference, _ = tc.prefill(smollm2[0], ids)
    assert cache.layers[0].keys.dtype == jnp.bfloat16
    assert int(logits.argmax()) == int(reference.argmax())
    top = np.argsort(-np.asarray(reference[0]))[:5]
    np.testing.assert_allclose(logits[0, top], reference[0, top], atol=0.5)
