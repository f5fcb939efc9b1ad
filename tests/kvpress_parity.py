"""Shared checks against kvpress: which entries it keeps, located in the uncompressed cache."""
import contextlib

import numpy as np
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


def ours_kept(model, press, ids, chunk_size=128):
    """Per layer and KV head, the positions our press keeps (prefill in chunks of `chunk_size`)."""
    _, cache = tc.prefill(model, [ids], press=press, chunk_size=chunk_size)
    return [[set(head[head >= 0].tolist()) for head in np.asarray(positions[0])] for positions in cache.positions]


def overlap(ours, theirs):
    shared = sum(len(a & b) for la, lb in zip(ours, theirs) for a, b in zip(la, lb))
    return shared / sum(len(b) for lb in theirs for b in lb)


@contextlib.contextmanager
def sdpa(hf_model):
    """Runs `hf_model` with SDPA attention for the block, then with its own again."""
    own = hf_model.config._attn_implementation
    hf_model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        hf_model.set_attn_implementation(own)


def kvpress_masked_kept(hf_model, press, ids):
    """Per layer and KV head, the positions a kvpress press that masks instead of evicting (AdaKV)
    keeps: all but those in each attention module's `masked_key_indices`. Such presses refuse eager
    attention, so the model runs with SDPA for the call."""
    with sdpa(hf_model), torch.no_grad(), press(hf_model):
        hf_model(torch.tensor([ids]), past_key_values=transformers.DynamicCache())
    kept = []
    for layer in hf_model.model.layers:
        _, heads, positions = layer.self_attn.masked_key_indices
        masked = [set(positions[heads == h].tolist()) for h in range(hf_model.config.num_key_value_heads)]
        kept.append([set(range(len(ids))) - m for m in masked])
    return kept


def kvpress_answer_token_by_token(hf_model, hf_tokenizer, press, context_ids, question_ids, max_new_tokens):
    """kvpress's pipeline answer (compress the context, then greedy decoding), feeding one token at
    a time with SDPA attention, which needs no attention mask: the pipeline sizes its mask from
    layer 0, so it cannot decode caches whose layers hold different numbers of entries (PyramidKV)."""
    stop = hf_model.generation_config.eos_token_id
    stop = stop if isinstance(stop, list) else [stop]
    cache = transformers.DynamicCache()
    with sdpa(hf_model), torch.no_grad():
        with press(hf_model):
            hf_model(torch.tensor([context_ids]), past_key_values=cache)
        tokens = list(question_ids)
        for step in range(len(question_ids) + max_new_tokens - 1):
            logits = hf_model(torch.tensor([[tokens[step]]]), past_key_values=cache,
                              position_ids=torch.tensor([[len(context_ids) + step]])).logits
            if step >= len(question_ids) - 1:  # the question is in: greedy answer tokens
                tokens.append(int(logits[0, -1].argmax()))
                if tokens[-1] in stop:
                    break
    return hf_tokenizer.decode(tokens[len(question_ids):], skip_special_tokens=True)
