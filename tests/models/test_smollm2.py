"""The real SmolLM2-135M-Instruct GGUF: parity with transformers loading the same file."""
import inspect
import json

import numpy as np
import pytest
import torch

import tokcomp_jax as tc
from conftest import essay
from tolerances import log_probability, model_tolerance


def _hf_ids(hf_tokenizer, text):
    ids = hf_tokenizer(text).input_ids
    return ids[1:] if ids[:1] == [hf_tokenizer.bos_token_id] else ids  # transformers adds a BOS


@pytest.mark.parametrize("text", [
    essay("worked.txt"), essay("founders.txt")[:20000], inspect.getsource(json.decoder),
    "Ünïcödé, emoji 🎉, CJK 漢字, digits 1234567 and <|im_start|>user\nhi<|im_end|>",
], ids=["essay", "essay2", "python-source", "unicode-special"])
def test_tokenizer_matches_transformers(smollm2, hf_smollm2, text):
    _, tokenizer = smollm2
    _, hf_tokenizer = hf_smollm2
    ids = tokenizer.encode(text)
    assert ids == _hf_ids(hf_tokenizer, text)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_chat_template_matches_transformers(smollm2, hf_smollm2):
    _, tokenizer = smollm2
    _, hf_tokenizer = hf_smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ours = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
    assert ours == list(theirs)


def test_per_token_nll_matches_transformers(smollm2, hf_smollm2):
    model, tokenizer = smollm2
    hf_model, _ = hf_smollm2
    ids = tokenizer.encode(essay("worked.txt"))[:600]
    assert len(ids) == 600
    logits, _ = tc.prefill(model, [ids], all_logits=True, chunk_size=256)
    logits = np.asarray(logits[0], np.float64)
    with torch.no_grad():
        hf_logits = hf_model(torch.tensor([ids])).logits[0].double().numpy()

    def nll(x):
        shifted = x - x.max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        return -logp[np.arange(len(ids) - 1), ids[1:]]

    # The network in two float32 orders (ours in chunks of 256, transformers' at once), then the
    # same log-softmax, in float64, on both sides.
    logits_tolerance = model_tolerance(model.config, len(ids), np.abs(hf_logits).max())
    tolerance = log_probability(logits_tolerance, model.config.vocab_size, np.float64)
    assert np.max(np.abs(nll(logits) - nll(hf_logits))) <= tolerance
    np.testing.assert_array_equal(logits.argmax(-1), hf_logits.argmax(-1))


def test_cached_decode_equals_full_forward_on_ragged_batch(smollm2):
    """32 decode steps over rows of different lengths give the logits of one full forward pass."""
    model, tokenizer = smollm2
    text_ids = tokenizer.encode(essay("avg.txt"))
    prompts = [text_ids[:40], text_ids[100:117]]
    continuation = [text_ids[200:232], text_ids[300:332]]
    logits, cache = tc.prefill(model, prompts, capacity=80)
    steps = [logits]
    for t in range(31):
        logits, cache = tc.decode(model, [continuation[0][t], continuation[1][t]], cache)
        steps.append(logits)
    for row in range(2):
        full = prompts[row] + continuation[row][:31]
        reference, _ = tc.prefill(model, [full], all_logits=True)
        decoded = np.stack([np.asarray(s[row]) for s in steps])
        expected = np.asarray(reference[0, len(prompts[row]) - 1:])
        # One network over the same tokens, summed in two orders (a cache of 80 slots and one key at
        # a time, against the padded prefill).
        tolerance = model_tolerance(model.config, len(full), np.abs(expected).max())
        np.testing.assert_allclose(decoded, expected, atol=tolerance, rtol=0)


def test_generate_matches_transformers_greedy(smollm2, hf_smollm2):
    model, tokenizer = smollm2
    hf_model, _ = hf_smollm2
    prompt = "Give me three tips for writing a good essay."
    ids = tc.generation.encode_prompts(tokenizer, [prompt], chat=True)[0]
    ours = tc.generate_ids(model, [ids], max_new_tokens=24, stop_ids=tokenizer.eos_ids).tokens[0]
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                   attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    theirs = [t for t in theirs[0, len(ids):].tolist() if t not in tokenizer.eos_ids]
    assert ours == theirs
