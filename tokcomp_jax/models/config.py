"""Configuration of the Llama family of decoders (Llama, Mistral, Qwen2, Qwen3)."""
from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: `linear` (position interpolation) or `llama3` (Llama 3.1)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_scaling type {self.rope_type!r} is not supported; use one of {SUPPORTED_ROPE_TYPES}."
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of a Llama-family decoder.

    `qkv_bias` adds biases to the q/k/v projections (Qwen2), `o_bias` to the output projection,
    `qk_norm` applies a per-head RMSNorm to queries and keys before RoPE (Qwen3), and
    `sliding_window` restricts each query to the last `sliding_window` keys (Mistral v0.1).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is not supported; tokcomp_jax runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}."
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}.")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Builds a config from a Hugging Face `config.json` dictionary."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"config.json has model_type {model_type!r}; tokcomp_jax supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}."
            )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [k for k in required if hf.get(k) is None]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(map(repr, missing))}.")
        wrong = [k for k in required + ("num_key_value_heads", "head_dim")
                 if hf.get(k) is not None and (not isinstance(hf[k], int) or isinstance(hf[k], bool))]
        if wrong:
            raise ValueError(f"config.json: {', '.join(f'{k}={hf[k]!r}' for k in wrong)} must be integers.")
        num_heads = hf["num_attention_heads"]
        if num_heads <= 0:
            raise ValueError(f"num_attention_heads must be positive, got {num_heads}.")
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        qkv_bias = {"qwen2": True}.get(model_type, bool(hf.get("attention_bias", False)))
        o_bias = model_type not in ("qwen2",) and bool(hf.get("attention_bias", False))
        window = hf.get("sliding_window")
        if model_type in ("qwen2", "qwen3"):
            if hf.get("use_sliding_window", False):
                raise ValueError(f"{model_type} with use_sliding_window=true is not supported.")
            window = None
        return cls(
            architecture=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=_hf_rope_theta(hf),
            rope_scaling=_hf_rope_scaling(hf),
            max_position_embeddings=hf.get("max_position_embeddings", 8192),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=window,
        )


def _hf_rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    # transformers >= 5 writes `rope_parameters`; older configs use `rope_theta` + `rope_scaling`.
    return hf.get("rope_parameters") or hf.get("rope_scaling") or {}


def _hf_rope_theta(hf: dict[str, Any]) -> float:
    return float(_hf_rope_parameters(hf).get("rope_theta", hf.get("rope_theta", 10000.0)))


def _hf_rope_scaling(hf: dict[str, Any]) -> RopeScaling:
    params = _hf_rope_parameters(hf)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return RopeScaling()
    kwargs = {k: params[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                     "original_max_position_embeddings") if k in params}
    return RopeScaling(rope_type=rope_type, **kwargs)


# A random 2-layer GQA Llama's shape: the model of tests and examples (`tc.testing.tiny_llama`) and
# the trainer's `config.model.name` "tiny".
TINY_CONFIG = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0)
