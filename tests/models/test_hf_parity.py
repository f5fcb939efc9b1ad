"""Logits parity with Hugging Face transformers (PyTorch CPU, eager attention), float32.

Tiny random Llama / Qwen2 / Qwen3 / Mistral models are saved with `save_pretrained` and loaded
with `tc.load`; their logits must match transformers' to the network's float32 bound (tests/tolerances.py:
the same sums in another library's order). Covers GQA, tied and untied
embeddings, q/k/v/o and MLP biases, Qwen3's q/k norm with an explicit head_dim, Llama-3 and
linear RoPE scaling, Mistral's sliding window, sharded safetensors, right-padded batches, a
bfloat16 load, and a llama.cpp-style GGUF written from the same weights.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

import jax.numpy as jnp
import torch
import transformers

import tokcomp_jax as tc
from checkpoint_fixtures import write_llama_gguf
from tokcomp_jax.checkpoints import hf
from tokcomp_jax.checkpoints.weights import build_model
from tokcomp_jax.models.config import ModelConfig, RopeScaling
from tolerances import model_tolerance

SEQ = 32  # longer than Mistral's window (8) and Llama-3's original context (16)

_TINY = dict(vocab_size=192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
             max_position_embeddings=256)

# name -> (config class, overrides, save_pretrained kwargs)
CASES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False), dict(max_shard_size="40KB")),
    "llama_tied_bias": ("LlamaConfig", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                            num_hidden_layers=3, vocab_size=160), {}),
    "llama3_rope": ("LlamaConfig", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)), {}),
    "llama_linear_rope": ("LlamaConfig", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0,
                                                                   factor=4.0)), {}),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, vocab_size=256,
                                  rope_parameters=dict(rope_type="default", rope_theta=1000000.0)), {}),
    "qwen3": ("Qwen3Config", dict(head_dim=24, tie_word_embeddings=False, num_hidden_layers=3), {}),
    "mistral": ("MistralConfig", dict(sliding_window=8, vocab_size=128), {}),
}


def _randomize(model: "torch.nn.Module", seed: int) -> None:
    """Non-trivial weights: embeddings of std 0.3 (logit std ~2 when tied), 2/sqrt(fan_in) linears, norms and
    biases near their defaults but not at them, so that logits are far from uniform and every term matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif "embed_tokens" in name:
                p.copy_(0.3 * noise)
            else:
                p.copy_(2.0 * noise / p.shape[1] ** 0.5)


def _make_hf(case: str, seed: int = 0):
    cls_name, overrides, _ = CASES[case]
    config = getattr(transformers, cls_name)(**{**_TINY, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name.replace("Config", "ForCausalLM"))(config)
    _randomize(model, seed)
    return model.eval().float()


def _hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """case -> (HF model, saved directory); built once per module."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for seed, case in enumerate(CASES):
        model = _make_hf(case, seed)
        directory = str(root / case)
        model.save_pretrained(directory, **CASES[case][2])
        out[case] = (model, directory)
    return out


def _ids(vocab: int, shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _tolerance(model, expected) -> float:
    """Two float32 computations of the network (ours, transformers') over SEQ tokens: `model_tolerance`
    of logits up to `expected`'s largest."""
    return model_tolerance(model.config, SEQ, np.abs(np.asarray(expected)).max())


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(checkpoints, case):
    hf_model, directory = checkpoints[case]
    model, tokenizer = tc.load(directory, load_tokenizer=False)
    assert tokenizer is None
    ids = _ids(hf_model.config.vocab_size, (2, SEQ), seed=1)
    expected = _hf_logits(hf_model, ids)
    assert np.std(expected) > 0.5, "random weights too small: logits are near-uniform"
    logits, cache = tc.prefill(model, ids, all_logits=True)
    assert logits.shape == expected.shape and logits.dtype == jnp.float32
    tolerance = _tolerance(model, expected)
    difference = _max_diff(logits, expected)
    assert difference <= tolerance, f"{case}: max |diff| {difference:.2e} > {tolerance:.2e}"
    assert cache.lengths[0].tolist() == [[SEQ] * model.config.num_kv_heads] * 2


def test_configs_map_as_expected(checkpoints):
    """The loaded configs carry the features each case is meant to exercise."""
    c = {case: tc.load(d, load_tokenizer=False)[0].config for case, (_, d) in checkpoints.items()}
    assert os.path.isfile(os.path.join(checkpoints["llama"][1], "model.safetensors.index.json"))
    assert not c["llama"].tie_word_embeddings and c["llama"].num_kv_heads == 2
    assert c["llama_tied_bias"].tie_word_embeddings and c["llama_tied_bias"].qkv_bias
    assert c["llama_tied_bias"].o_bias and c["llama_tied_bias"].mlp_bias
    assert c["llama3_rope"].rope_scaling.rope_type == "llama3" and c["llama3_rope"].rope_theta == 500000.0
    assert c["llama3_rope"].rope_scaling.original_max_position_embeddings == 16
    assert c["llama_linear_rope"].rope_scaling.rope_type == "linear"
    assert c["qwen2"].qkv_bias and not c["qwen2"].o_bias and c["qwen2"].rope_theta == 1e6
    assert c["qwen3"].qk_norm and c["qwen3"].head_dim == 24 and c["qwen3"].sliding_window is None
    assert c["mistral"].sliding_window == 8


def test_llama3_scaling_changes_logits(checkpoints):
    """Guards the llama3 case against testing nothing: the same weights without scaling differ."""
    hf_model, directory = checkpoints["llama3_rope"]
    config = dataclasses.replace(hf.read_config(directory), rope_scaling=RopeScaling())
    model = build_model(config, hf.read_weights(directory), source=directory)
    ids = _ids(hf_model.config.vocab_size, (1, SEQ), seed=3)
    unscaled, _ = tc.prefill(model, ids, all_logits=True)
    expected = _hf_logits(hf_model, ids)
    assert _max_diff(unscaled, expected) > _tolerance(model, expected)  # beyond what the parity test allows


@pytest.mark.parametrize("case", ["llama", "qwen3", "mistral", "llama3_rope"])
def test_right_padded_batch_matches_rows_alone(checkpoints, case):
    hf_model, directory = checkpoints[case]
    model, _ = tc.load(directory, load_tokenizer=False)
    vocab = hf_model.config.vocab_size
    rows = [_ids(vocab, (n,), seed=10 + n).tolist() for n in (SEQ, 13, 1, 27)]
    logits, cache = tc.prefill(model, rows, all_logits=True)
    assert logits.shape == (len(rows), SEQ, vocab)
    for b, row in enumerate(rows):
        expected = _hf_logits(hf_model, [row])[0]
        got = np.asarray(logits[b, :len(row)])
        assert _max_diff(got, expected) <= _tolerance(model, expected), f"{case} row {b} (length {len(row)})"
    assert cache.num_seen.tolist() == [len(r) for r in rows]


def test_bfloat16_load_agrees_with_float32(checkpoints):
    hf_model, directory = checkpoints["llama"]
    model32, _ = tc.load(directory, load_tokenizer=False)
    model16, _ = tc.load(directory, dtype="bfloat16", load_tokenizer=False)
    assert model16.embed_tokens.embedding.get_value().dtype == jnp.bfloat16
    assert model16.layers[0].self_attn.q_proj.kernel.get_value().dtype == jnp.bfloat16
    ids = _ids(model32.config.vocab_size, (2, SEQ), seed=5)
    ref = np.asarray(tc.prefill(model32, ids, all_logits=True)[0])
    low, cache = tc.prefill(model16, ids, all_logits=True)
    low = np.asarray(low)
    assert low.dtype == np.float32 and np.isfinite(low).all()
    assert cache.layers[0].keys.dtype == jnp.bfloat16
    # bfloat16 keeps 8 significant bits (relative step 2**-8); weights, activations and the cache
    # all round, so errors reach a few percent of the logit scale. Measure them against the
    # reference implementation doing the same in bfloat16: ours may not be much worse.
    hf16 = _hf_logits(_make_hf("llama", seed=0).to(torch.bfloat16), ids)
    assert _max_diff(_hf_logits(_make_hf("llama", seed=0), ids), ref) <= _tolerance(model32, ref)  # same weights
    scale = np.std(ref)
    ours, theirs = np.abs(low - ref), np.abs(hf16 - ref)
    assert ours.mean() <= 0.05 * scale and ours.max() <= 0.3 * scale, (ours.mean(), ours.max(), scale)
    assert ours.mean() <= 1.5 * theirs.mean(), (ours.mean(), theirs.mean())
    # A wrong weight or layout would scramble the ranking (agreement ~1/vocab); rounding only
    # flips near ties.
    assert (np.argmax(low, -1) == np.argmax(ref, -1)).mean() >= 0.9


def _hparams(config) -> dict:
    return dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_parameters["rope_theta"],
                max_position_embeddings=config.max_position_embeddings)


@pytest.mark.parametrize("case", ["llama", "llama_tied_bias"])
def test_gguf_round_trip_matches_transformers(checkpoints, tmp_path, case):
    """A float32 GGUF written like llama.cpp's converter (Q/K rows permuted, biases included)."""
    hf_model, _ = checkpoints[case]
    tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    if hf_model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # llama.cpp writes no output.weight for tied models
    path = write_llama_gguf(str(tmp_path / f"{case}.gguf"), _hparams(hf_model.config), tensors)
    model, tokenizer = tc.load(path)
    assert model.config.tie_word_embeddings == hf_model.config.tie_word_embeddings
    ids = _ids(hf_model.config.vocab_size, (2, SEQ), seed=7)
    logits, _ = tc.prefill(model, ids, all_logits=True)
    expected = _hf_logits(hf_model, ids)
    assert _max_diff(logits, expected) <= _tolerance(model, expected)
    assert tokenizer.decode(tokenizer.encode("hello world")) == "hello world"
    assert tokenizer.encode("hello")[0] == tokenizer.bos_id == 0 and tokenizer.eos_ids == (1,)


def test_legacy_rope_config_keys():
    """transformers 4 configs put `rope_theta` at the top level and scaling under `rope_scaling`."""
    base = dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=128,
                num_hidden_layers=1, num_attention_heads=4)
    legacy = ModelConfig.from_hf({**base, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}})
    current = ModelConfig.from_hf({**base, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}})
    assert legacy == current
    linear = ModelConfig.from_hf({**base, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert linear.rope_scaling.rope_type == "linear" and linear.rope_scaling.factor == 2.0
    assert ModelConfig.from_hf({**base, "rope_scaling": None}).rope_theta == 10000.0
    assert ModelConfig.from_hf(base).num_kv_heads == 4 and ModelConfig.from_hf(base).head_dim == 16
