"""Shared checks against kvpress: which entries it keeps, located in the uncompressed cache."""
import numpy as np
import pytest
import torch
import transformers

import tokcomp_jax as tc


def full_keys(hf_model, ids):
    """Per layer, the `[Hkv, S, D]` keys transformers caches without compression."""
    cache = transformers.DynamicCache()
    with torch.no_grad():
        hf_model(torch.tensor([ids]), past_key_values=cache)
    return [layer.keys[0] for layer in cache.layers]


def kvpress_kept(hf_model, press, ids, uncompressed):
    """Per layer and KV head, the positions kvpress keeps: its compressed keys located in the full
    cache (kvpress gathers them unchanged, so each matches one full-cache key exactly)."""
    cache = transformers.DynamicCache()
    with torch.no_grad(), press(hf_model):
        hf_model(torch.tensor([ids]), past_key_values=cache)
    kept = []
    for layer, full in zip(cache.layers, uncompressed):
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
