"""Parity with kvpress 0.5.5 (PyTorch): the same entries are kept, layer by layer and KV head by KV
head, on the real SmolLM2 weights and on a tiny random Llama, for the same input ids."""
import kvpress
import numpy as np
import pytest

import tokcomp_jax as tc
from conftest import essay
from kvpress_parity import full_keys, kvpress_kept, ours_kept, overlap

PAIRS = {
    "streaming_llm": (tc.presses.streaming_llm, kvpress.StreamingLLMPress),
    "knorm": (tc.presses.knorm, kvpress.KnormPress),
    "snapkv": (tc.presses.snapkv, kvpress.SnapKVPress),
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_smollm2_keeps_what_kvpress_keeps(smollm2, hf_smollm2, name):
    model, tokenizer = smollm2
    hf_model, _ = hf_smollm2
    ids = tokenizer.encode(essay("worked.txt"))[:300]
    ours_factory, theirs_class = PAIRS[name]
    theirs = kvpress_kept(hf_model, theirs_class(compression_ratio=0.5), ids, full_keys(hf_model, ids))
    assert overlap(ours_kept(model, ours_factory(0.5), ids, chunk_size=512), theirs) >= 0.99  # one compilation


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_tiny_llama_keeps_what_kvpress_keeps(tiny_pair, name, ratio):
    hf_model, model = tiny_pair
    ids = np.random.default_rng(0).integers(0, 128, 300).tolist()  # budget >= SnapKV's 64-token window
    ours_factory, theirs_class = PAIRS[name]
    theirs = kvpress_kept(hf_model, theirs_class(compression_ratio=ratio), ids, full_keys(hf_model, ids))
    assert overlap(ours_kept(model, ours_factory(ratio), ids), theirs) >= 0.99


@pytest.fixture(scope="module")
def kvpress_pipeline(hf_smollm2):
    hf_model, hf_tokenizer = hf_smollm2
    import transformers
    return transformers.pipeline("kv-press-text-generation", model=hf_model, tokenizer=hf_tokenizer)


@pytest.mark.parametrize("name", [None, *PAIRS])
def test_needle_answers_match_the_kvpress_pipeline(smollm2, kvpress_pipeline, name):
    """Question-agnostic compression of a context with a needle, then a greedy answer: the same text
    as kvpress's `kv-press-text-generation` pipeline, with and without each press."""
    model, tokenizer = smollm2
    text = essay("avg.txt")[:1500]
    context = text[:700] + " The special magic number is 48213. " + text[700:]
    questions = ["What is the special magic number?"]
    ours = tc.answer_questions(model, tokenizer, context, questions, max_new_tokens=12,
                               press=PAIRS[name][0](0.5) if name else None)
    theirs = kvpress_pipeline(context, questions=questions, max_new_tokens=12,
                              press=PAIRS[name][1](compression_ratio=0.5) if name else None)["answers"]
    assert ours == theirs
    if name is None:
        assert "48213" in ours[0]
