"""GGUF checkpoints (llama.cpp): config from metadata, dequantized weights, tokenizer spec."""
from __future__ import annotations

import os
import struct
from typing import Any, Iterator

import gguf
import numpy as np

from tokcomp_jax.checkpoints.weights import CheckpointError
from tokcomp_jax.models.config import ModelConfig, RopeScaling

GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")

_TENSOR_NAMES = {  # GGUF name -> Hugging Face name ({} is the layer index)
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{}.attn_norm": "model.layers.{}.input_layernorm",
    "blk.{}.ffn_norm": "model.layers.{}.post_attention_layernorm",
    "blk.{}.attn_q": "model.layers.{}.self_attn.q_proj",
    "blk.{}.attn_k": "model.layers.{}.self_attn.k_proj",
    "blk.{}.attn_v": "model.layers.{}.self_attn.v_proj",
    "blk.{}.attn_output": "model.layers.{}.self_attn.o_proj",
    "blk.{}.attn_q_norm": "model.layers.{}.self_attn.q_norm",
    "blk.{}.attn_k_norm": "model.layers.{}.self_attn.k_norm",
    "blk.{}.ffn_gate": "model.layers.{}.mlp.gate_proj",
    "blk.{}.ffn_up": "model.layers.{}.mlp.up_proj",
    "blk.{}.ffn_down": "model.layers.{}.mlp.down_proj",
}


class GGUFFile:
    """An opened GGUF file: `config`, `weights()` in Hugging Face naming and layout, `metadata`."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise CheckpointError(f"GGUF file {path} does not exist.")
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:  # the reader raises ValueError/IndexError/... on damaged files
            raise CheckpointError(f"{path} is not a readable GGUF file (truncated or corrupt): {e}") from e
        self.path = path
        self._check_tensor_extents()
        self.architecture = self.metadata("general.architecture")
        if self.architecture not in GGUF_ARCHITECTURES:
            raise CheckpointError(
                f"{path}: architecture {self.architecture!r} is not supported; GGUF files of "
                f"{', '.join(GGUF_ARCHITECTURES)} models load.")
        self.config = self._config()

    def _check_tensor_extents(self) -> None:
        size = os.path.getsize(self.path)
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise CheckpointError(f"{self.path} is truncated: tensor {t.name!r} ends past the end of the file.")

    def metadata(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:  # e.g. UnicodeDecodeError on a damaged string
            raise CheckpointError(f"{self.path}: metadata {key!r} is corrupt ({e}).") from e

    def _config(self) -> ModelConfig:
        arch = self.architecture
        get = lambda k, d=None: self.metadata(f"{arch}.{k}", d)

        def require(key: str) -> int:
            value = get(key)
            if value is None:
                raise CheckpointError(f"{self.path} lacks the metadata key {arch}.{key!r}.")
            if not isinstance(value, int) or value <= 0:
                raise CheckpointError(f"{self.path}: metadata {arch}.{key} must be a positive integer, got {value!r}.")
            return value

        names = {t.name for t in self.reader.tensors}
        if "rope_freqs.weight" in names:
            raise CheckpointError(f"{self.path}: GGUF rope_freqs (Llama 3.1 scaling) is not supported; "
                                  "load the Hugging Face directory of this model instead.")
        num_layers = require("block_count")
        blocks = {int(n.split(".")[1]) for n in names if n.startswith("blk.") and n.split(".")[1].isdigit()}
        if len(blocks) != num_layers or max(blocks, default=-1) != num_layers - 1:  # i.e. not 0..n-1
            raise CheckpointError(f"{self.path}: {arch}.block_count is {num_layers} but the file has tensors "
                                  f"for {len(blocks)} blocks (blk.0 to blk.{max(blocks, default=-1)}).")
        num_heads = require("attention.head_count")
        hidden = require("embedding_length")
        head_dim = get("attention.key_length") or hidden // num_heads
        rope_dims = get("rope.dimension_count")
        if rope_dims is not None and rope_dims != head_dim:
            raise CheckpointError(f"{self.path}: partial RoPE ({arch}.rope.dimension_count={rope_dims} of "
                                  f"head_dim {head_dim}) is not supported.")
        vocab_size = get("vocab_size") or len(self.metadata("tokenizer.ggml.tokens", []))
        if not vocab_size:
            raise CheckpointError(f"{self.path} has neither {arch}.vocab_size nor tokenizer.ggml.tokens.")
        try:
            return ModelConfig(
                architecture=arch,
                vocab_size=vocab_size,
                hidden_size=hidden,
                intermediate_size=require("feed_forward_length"),
                num_layers=num_layers,
                num_heads=num_heads,
                num_kv_heads=get("attention.head_count_kv") or num_heads,
                head_dim=head_dim,
                rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(get("rope.freq_base", 10000.0)),
                rope_scaling=self._rope_scaling(),
                max_position_embeddings=get("context_length", 8192),
                tie_word_embeddings="output.weight" not in names,
                # llama.cpp loads these biases when the file has them (Qwen2 always has q/k/v ones).
                qkv_bias="blk.0.attn_q.bias" in names,
                o_bias="blk.0.attn_output.bias" in names,
                mlp_bias="blk.0.ffn_up.bias" in names,
                qk_norm=arch == "qwen3",
            )
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{self.path}: invalid model metadata: {e}") from e

    def _rope_scaling(self) -> RopeScaling:
        kind = self.metadata(f"{self.architecture}.rope.scaling.type", "none")
        factor = self.metadata(f"{self.architecture}.rope.scaling.factor")
        if kind == "none" or (kind == "linear" and factor in (None, 1.0)):
            return RopeScaling()
        if kind == "linear":
            return RopeScaling(rope_type="linear", factor=float(factor))
        raise CheckpointError(f"{self.path}: RoPE scaling {kind!r} is not supported (none and linear are).")

    def weights(self) -> Iterator[tuple[str, np.ndarray]]:
        """Dequantized float32 tensors with HF names; llama.cpp's Q/K row permutation undone."""
        c = self.config
        for t in self.reader.tensors:
            name = _hf_name(t.name)
            if name is None:
                raise CheckpointError(f"{self.path}: unexpected tensor {t.name!r}.")
            try:
                array = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            except (NotImplementedError, ValueError) as e:
                raise CheckpointError(f"{self.path}: cannot read tensor {t.name!r} of type "
                                      f"{t.tensor_type.name}: {e}") from e
            if self.architecture == "llama" and name.endswith(
                    ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
                heads = c.num_heads if "q_proj" in name else c.num_kv_heads
                if array.shape[0] % (2 * heads):
                    raise CheckpointError(f"{self.path}: tensor {t.name!r} has shape {array.shape}, "
                                          f"which does not split into {heads} heads.")
                array = unpermute_rope_rows(array, heads)
            yield name, array


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverts llama.cpp's interleaving of the rotary halves in each head's rows of Wq / Wk (or of
    the q / k biases: llama.cpp's converter permutes those too)."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _hf_name(gguf_name: str) -> str | None:
    stem, _, kind = gguf_name.rpartition(".")
    parts = stem.split(".")
    layer = next((p for p in parts if p.isdigit()), None)
    key = stem.replace(f".{layer}.", ".{}.") if layer is not None else stem
    if key not in _TENSOR_NAMES or kind not in ("weight", "bias"):
        return None
    return f"{_TENSOR_NAMES[key].format(layer)}.{kind}"


# GGUF metadata value types (ggml's gguf.h): fixed-size scalars by struct format, strings, arrays.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                   12: "<d"}
_STRING, _ARRAY = 8, 9


def read_context_length(path: str) -> int | None:
    """`{architecture}.context_length` of a GGUF file, read from the metadata before it (GGUFReader
    parses all of it, the vocabulary included, in seconds); None if the metadata holds none."""
    with open(path, "rb") as f:
        def read(fmt: str):
            size = struct.calcsize(fmt)
            data = f.read(size)
            if len(data) != size:
                raise CheckpointError(f"{path} is truncated: its metadata ends early.")
            return struct.unpack(fmt, data)[0]

        def value(kind: int):
            if kind == _STRING:
                return f.read(read("<Q")).decode("utf-8", errors="replace")
            if kind == _ARRAY:
                item, count = read("<I"), read("<Q")
                if item in _SCALAR_FORMATS:  # skipped, not decoded
                    f.seek(count * struct.calcsize(_SCALAR_FORMATS[item]), os.SEEK_CUR)
                    return None
                return [value(item) for _ in range(count)]
            if kind not in _SCALAR_FORMATS:
                raise CheckpointError(f"{path}: metadata value type {kind} is not a GGUF type (corrupt file).")
            return read(_SCALAR_FORMATS[kind])

        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{path} is not a GGUF file (it does not start with GGUF).")
        read("<I")  # version
        read("<Q")  # tensor count
        architecture = None
        for _ in range(read("<Q")):
            key = value(_STRING)
            found = value(read("<I"))
            if key == "general.architecture":
                architecture = found
            elif architecture is not None and key == f"{architecture}.context_length":
                return int(found)
    return None

