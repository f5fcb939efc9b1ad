"""Writers of tiny checkpoints for the loader tests: Hugging Face directories and llama.cpp GGUF files.

Nothing here needs PyTorch: tensors are numpy arrays in Hugging Face naming and layout
(`model.layers.0.self_attn.q_proj.weight` shaped `[out, in]`), as `model.state_dict()` gives them.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import gguf
import numpy as np
from safetensors.numpy import save_file

# A tiny Llama in Hugging Face `config.json` terms (GQA: 4 query heads over 2 KV heads).
LLAMA_HPARAMS = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}

# Hugging Face name -> GGUF name ({} is the layer index), as llama.cpp's converter writes them.
HF_TO_GGUF = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "model.layers.{}.input_layernorm": "blk.{}.attn_norm",
    "model.layers.{}.post_attention_layernorm": "blk.{}.ffn_norm",
    "model.layers.{}.self_attn.q_proj": "blk.{}.attn_q",
    "model.layers.{}.self_attn.k_proj": "blk.{}.attn_k",
    "model.layers.{}.self_attn.v_proj": "blk.{}.attn_v",
    "model.layers.{}.self_attn.o_proj": "blk.{}.attn_output",
    "model.layers.{}.self_attn.q_norm": "blk.{}.attn_q_norm",
    "model.layers.{}.self_attn.k_norm": "blk.{}.attn_k_norm",
    "model.layers.{}.mlp.gate_proj": "blk.{}.ffn_gate",
    "model.layers.{}.mlp.up_proj": "blk.{}.ffn_up",
    "model.layers.{}.mlp.down_proj": "blk.{}.ffn_down",
}


def random_llama_tensors(hparams: Mapping = LLAMA_HPARAMS, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights, in Hugging Face naming and layout, of the Llama `hparams` describes."""
    rng = np.random.default_rng(seed)
    h, f, v = hparams["hidden_size"], hparams["intermediate_size"], hparams["vocab_size"]
    heads, kv_heads = hparams["num_attention_heads"], hparams["num_key_value_heads"]
    d = hparams.get("head_dim") or h // heads
    normal = lambda *shape, std=0.2: (std * rng.standard_normal(shape)).astype(np.float32)
    tensors = {"model.embed_tokens.weight": normal(v, h, std=1.0),
               "model.norm.weight": 1 + normal(h, std=0.1)}
    if not hparams.get("tie_word_embeddings", False):
        tensors["lm_head.weight"] = normal(v, h)
    for i in range(hparams["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": 1 + normal(h, std=0.1),
            p + "post_attention_layernorm.weight": 1 + normal(h, std=0.1),
            p + "self_attn.q_proj.weight": normal(heads * d, h),
            p + "self_attn.k_proj.weight": normal(kv_heads * d, h),
            p + "self_attn.v_proj.weight": normal(kv_heads * d, h),
            p + "self_attn.o_proj.weight": normal(h, heads * d),
            p + "mlp.gate_proj.weight": normal(f, h),
            p + "mlp.up_proj.weight": normal(f, h),
            p + "mlp.down_proj.weight": normal(h, f),
        })
    return tensors


def write_hf_dir(directory: str, hparams: Mapping, tensors: Mapping[str, np.ndarray], *,
                 shards: int = 1) -> str:
    """Writes `config.json` and `model.safetensors` (or `shards` files and their index)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(hparams), f, indent=2)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return directory
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        filename = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, os.path.join(directory, filename), metadata={"format": "pt"})
        weight_map.update({n: filename for n in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    return directory


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `permute` (convert_hf_to_gguf.py): interleaves the rotary halves of each head."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_name(hf_name: str) -> str:
    stem, _, kind = hf_name.rpartition(".")
    parts = stem.split(".")
    layer = next((p for p in parts if p.isdigit()), None)
    key = stem.replace(f".{layer}.", ".{}.") if layer is not None else stem
    return f"{HF_TO_GGUF[key].format(layer)}.{kind}"


def tiny_bpe_vocab(vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """A byte-level BPE vocabulary of `vocab_size` tokens: `<s>`, `</s>`, the printable ASCII bytes
    (space is `Ġ`), a few merges, and unused fillers. Returns (tokens, token types, merges)."""
    tokens = ["<s>", "</s>"] + ["Ġ"] + [chr(b) for b in range(33, 127)]
    merges = ["h e", "l l", "o Ġ", "Ġ w", "he ll", "r l"]
    tokens += [m.replace(" ", "") for m in merges]
    if len(tokens) > vocab_size:
        raise ValueError(f"vocab_size must be at least {len(tokens)}")
    types = [3, 3] + [1] * (len(tokens) - 2)
    fillers = vocab_size - len(tokens)
    tokens += [f"<unused{i}>" for i in range(fillers)]
    types += [5] * fillers
    return tokens, types, merges


def write_llama_gguf(path: str, hparams: Mapping, tensors: Mapping[str, np.ndarray], *,
                     arch: str = "llama", tokenizer: bool = True, skip_keys: tuple[str, ...] = (),
                     extra_tensors: Mapping[str, np.ndarray] | None = None, configure=None) -> str:
    """Writes a float32 GGUF the way llama.cpp's converter does for Llama: metadata under `arch.`,
    GGUF tensor names, Wq/Wk rows and q/k biases permuted (for `arch="llama"`), a tiny `gpt2`
    tokenizer.

    `skip_keys` leaves out metadata keys (without the `arch.` prefix), `extra_tensors` adds tensors
    by their GGUF names and `configure(writer)` adds metadata, to build unusual or broken files.
    """
    writer = gguf.GGUFWriter(path, arch)
    heads = hparams["num_attention_heads"]
    kv_heads = hparams.get("num_key_value_heads") or heads
    metadata = {
        "block_count": lambda: writer.add_block_count(hparams["num_hidden_layers"]),
        "embedding_length": lambda: writer.add_embedding_length(hparams["hidden_size"]),
        "feed_forward_length": lambda: writer.add_feed_forward_length(hparams["intermediate_size"]),
        "attention.head_count": lambda: writer.add_head_count(heads),
        "attention.head_count_kv": lambda: writer.add_head_count_kv(kv_heads),
        "rope.freq_base": lambda: writer.add_rope_freq_base(hparams.get("rope_theta", 10000.0)),
        "attention.layer_norm_rms_epsilon": lambda: writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"]),
        "context_length": lambda: writer.add_context_length(hparams.get("max_position_embeddings", 2048)),
        "vocab_size": lambda: writer.add_vocab_size(hparams["vocab_size"]),
    }
    for key, add in metadata.items():
        if key not in skip_keys:
            add()
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if tokenizer:
        tokens, types, merges = tiny_bpe_vocab(hparams["vocab_size"])
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(1)
        writer.add_add_bos_token(True)
    for name, array in tensors.items():
        array = np.asarray(array, np.float32)
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            array = llama_cpp_permute(array, heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            array = llama_cpp_permute(array, kv_heads)
        writer.add_tensor(gguf_name(name), np.ascontiguousarray(array))
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, np.ascontiguousarray(array, np.float32))
    if configure is not None:
        configure(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
