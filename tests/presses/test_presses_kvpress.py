"""Parity with kvpress 0.5.5 (PyTorch) for every press it has: the same entries kept, layer by layer
and KV head by KV head, on a tiny random Llama and on the real SmolLM2 weights for the same input
ids, and the same greedy answers to a needle question from kvpress's `kv-press-text-generation`
pipeline.

Where the scores have no ties the selections agree exactly (measured overlap 1.0); the 99%
tolerance absorbs float32 rounding differences between XLA and PyTorch at the selection boundary.
"""
import contextlib

import kvpress
import numpy as np
import pytest
import transformers

import tokcomp_jax as tc
from conftest import essay
from kvpress_parity import (full_keys, kvpress_answer_token_by_token, kvpress_kept, kvpress_masked_kept, ours_kept,
                            overlap, sdpa)

P = tc.presses
# name -> (our press for (ratio, num_layers), kvpress's press for ratio)
PAIRS = {
    "streaming_llm": (lambda r, n: P.streaming_llm(r), lambda r: kvpress.StreamingLLMPress(compression_ratio=r)),
    "knorm": (lambda r, n: P.knorm(r), lambda r: kvpress.KnormPress(compression_ratio=r)),
    "snapkv": (lambda r, n: P.snapkv(r), lambda r: kvpress.SnapKVPress(compression_ratio=r)),
    "observed_attention": (lambda r, n: P.observed_attention(r),
                           lambda r: kvpress.ObservedAttentionPress(compression_ratio=r)),
    "tova": (lambda r, n: P.tova(r), lambda r: kvpress.TOVAPress(compression_ratio=r)),
    "keydiff": (lambda r, n: P.keydiff(r), lambda r: kvpress.KeyDiffPress(compression_ratio=r)),
    "expected_attention": (lambda r, n: P.expected_attention(r),
                           lambda r: kvpress.ExpectedAttentionPress(compression_ratio=r)),
    "pyramidkv": (lambda r, n: P.pyramidkv(r, num_layers=n), lambda r: kvpress.PyramidKVPress(compression_ratio=r)),
    "adakv_snapkv": (lambda r, n: P.adakv(P.snapkv(r)),
                     lambda r: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=r))),
}
MASKING = {"adakv_snapkv"}  # kvpress masks these presses' evicted keys instead of removing them
UNEVEN_LAYERS = {"pyramidkv"}  # kvpress's pipeline cannot decode caches whose layers differ in length


def theirs_kept(hf_model, name, ratio, ids, uncompressed):
    press = PAIRS[name][1](ratio)
    if name in MASKING:
        return kvpress_masked_kept(hf_model, press, ids)
    return kvpress_kept(hf_model, press, ids, uncompressed)


def attention_for(hf_model, name):
    """kvpress's masking presses refuse eager attention; the others run with it (H2O reads it)."""
    return sdpa(hf_model) if name in MASKING else contextlib.nullcontext()


@pytest.fixture(scope="module")
def tiny_prompt(tiny_pair):
    ids = np.random.default_rng(0).integers(0, 128, 300).tolist()  # budgets >= SnapKV's 64-token window
    return ids, full_keys(tiny_pair[0], ids)


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_tiny_llama_keeps_what_kvpress_keeps(tiny_pair, tiny_prompt, name, ratio):
    hf_model, model = tiny_pair
    ids, uncompressed = tiny_prompt
    theirs = theirs_kept(hf_model, name, ratio, ids, uncompressed)
    ours = ours_kept(model, PAIRS[name][0](ratio, model.config.num_layers), ids)
    assert sum(map(len, ours[0])) == sum(map(len, theirs[0]))
    assert overlap(ours, theirs) >= 0.99


NEEDLE_QUESTION = "What is the special magic number?"
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def needle(smollm2, hf_smollm2):
    """A context with a needle, its token ids (as the pipeline splits them) and transformers'
    uncompressed keys for them."""
    text = essay("avg.txt")[:1500]
    context = text[:700] + " The special magic number is 48213. " + text[700:]
    context_ids, question_ids = tc.generation.split_context_and_questions(smollm2[1], context, [NEEDLE_QUESTION])
    return context, context_ids, question_ids[0], full_keys(hf_smollm2[0], context_ids)


@pytest.fixture(scope="module")
def kvpress_pipeline(hf_smollm2):
    hf_model, hf_tokenizer = hf_smollm2
    return transformers.pipeline("kv-press-text-generation", model=hf_model, tokenizer=hf_tokenizer)


@pytest.mark.slow(reason="the first test of the file: loads SmolLM2 in JAX and in PyTorch for kvpress's pipeline, "
                         "and answers on both")
def test_needle_answer_without_compression(smollm2, kvpress_pipeline, needle):
    context = needle[0]
    ours = tc.answer_questions(*smollm2, context, [NEEDLE_QUESTION], max_new_tokens=MAX_NEW_TOKENS)
    theirs = kvpress_pipeline(context, questions=[NEEDLE_QUESTION], max_new_tokens=MAX_NEW_TOKENS)["answers"]
    assert ours == theirs
    assert "48213" in ours[0]


@pytest.mark.slow(reason="kvpress's pipeline and ours on SmolLM2 with the press: ours compiles the press's "
                         "programs for the 30 unrolled layers (pyramidkv: a capacity per layer)")
@pytest.mark.parametrize("name", list(PAIRS))
def test_smollm2_keeps_and_answers_what_kvpress_does(smollm2, hf_smollm2, kvpress_pipeline, needle, name):
    """Question-agnostic compression (ratio 0.5) of the needle context: the same entries kept as
    kvpress, then the same greedy answer as its pipeline."""
    model, tokenizer = smollm2
    hf_model, hf_tokenizer = hf_smollm2
    context, context_ids, question_ids, uncompressed = needle
    press = PAIRS[name][0](0.5, model.config.num_layers)
    # The cache answer_questions makes: the context, compressed, with room for the question and answer.
    capacity = len(context_ids) + len(question_ids) + MAX_NEW_TOKENS
    _, cache = tc.prefill(model, [context_ids], press=press, capacity=capacity)
    ours_positions = [[set(head[head >= 0].tolist()) for head in np.asarray(p[0])] for p in cache.positions]
    with attention_for(hf_model, name):
        theirs_positions = theirs_kept(hf_model, name, 0.5, context_ids, uncompressed)
        if name in UNEVEN_LAYERS:
            theirs = [kvpress_answer_token_by_token(hf_model, hf_tokenizer, PAIRS[name][1](0.5), context_ids,
                                                    question_ids, MAX_NEW_TOKENS)]
        else:
            theirs = kvpress_pipeline(context, questions=[NEEDLE_QUESTION], max_new_tokens=MAX_NEW_TOKENS,
                                      press=PAIRS[name][1](0.5))["answers"]
    assert overlap(ours_positions, theirs_positions) >= 0.99
    ours = tc.answer_questions(model, tokenizer, context, [NEEDLE_QUESTION], max_new_tokens=MAX_NEW_TOKENS,
                               press=press)
    assert ours == theirs
