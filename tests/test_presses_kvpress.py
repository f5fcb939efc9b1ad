"""Parity with kvpress 0.5.5 (PyTorch): the same entries are kept, layer by layer and KV head by KV
head, on the real SmolLM2 weights and on a tiny random Llama, for the same input ids."""
import kvpress
import numpy as np
import pytest
import torch
import transformers

import tokcomp_jax as tc
from conftest import essay

PAIRS = {
    "streaming_llm": (tc.presses.streaming_llm, kvpress.StreamingLLMPress),
    "knorm": (tc.presses.knorm, kvpress.KnormPress),
    "snapkv": (tc.presses.snapkv, kvpress.SnapKVPress),
}


def _full_keys(hf_model, ids):
    cache = transformers.DynamicCache()
    with torch.no_grad():
        hf_model(torch.tensor([ids]), past_key_values=cache)
    return [layer.keys[0] for layer in cache.layers]


def kvpress_kept(hf_model, press, ids, full_keys):
    """Per layer and KV head, the positions kvpress keeps: its compressed keys located in the full
    cache (kvpress gathers them unchanged, so each matches one full-cache key exactly)."""
    cache = transformers.DynamicCache()
    with torch.no_grad(), press(hf_model):
        hf_model(torch.tensor([ids]), past_key_values=cache)
    kept = []
    for layer, full in zip(cache.layers, full_keys):
        distances = [torch.cdist(layer.keys[0, h], full[h], compute_mode="donot_use_mm_for_euclid_dist")
                     for h in range(full.shape[0])]
        assert all(float(d.min(-1).values.max()) == 0.0 for d in distances)
        kept.append([set(d.argmin(-1).tolist()) for d in distances])
    return kept


def ours_kept(model, press, ids):
    _, cache = tc.prefill(model, [ids], press=press, chunk_size=128)
    return [[set(np.asarray(layer.positions[0, h, :int(layer.lengths[0, h])]).tolist())
             for h in range(layer.lengths.shape[1])] for layer in cache.layers]


def overlap(ours, theirs):
    shared = sum(len(a & b) for la, lb in zip(ours, theirs) for a, b in zip(la, lb))
    return shared / sum(len(b) for lb in theirs for b in lb)


@pytest.mark.parametrize("name", list(PAIRS))
def test_smollm2_keeps_what_kvpress_keeps(smollm2, hf_smollm2, name):
    model, tokenizer = smollm2
    hf_model, _ = hf_smollm2
    ids = tokenizer.encode(essay("worked.txt"))[:300]
    ours_factory, theirs_class = PAIRS[name]
    theirs = kvpress_kept(hf_model, theirs_class(compression_ratio=0.5), ids, _full_keys(hf_model, ids))
    assert overlap(ours_kept(model, ours_factory(0.5), ids), theirs) >= 0.99


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A tiny random Llama in transformers (eager attention) and the same weights in tokcomp_jax."""
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.normal_(0, 0.3)
    directory = str(tmp_path_factory.mktemp("tiny_llama"))
    hf_model.save_pretrained(directory)
    return hf_model, tc.load(directory, load_tokenizer=False)[0]


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_tiny_llama_keeps_what_kvpress_keeps(tiny_pair, name, ratio):
    hf_model, model = tiny_pair
    ids = np.random.default_rng(0).integers(0, 128, 300).tolist()  # budget >= SnapKV's 64-token window
    ours_factory, theirs_class = PAIRS[name]
    theirs = kvpress_kept(hf_model, theirs_class(compression_ratio=ratio), ids, _full_keys(hf_model, ids))
    assert overlap(ours_kept(model, ours_factory(ratio), ids), theirs) >= 0.99
