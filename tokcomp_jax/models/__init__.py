"""Model families: the Llama-family decoder (Llama, Mistral, Qwen2, Qwen3)."""
from tokcomp_jax.models.config import ModelConfig, RopeScaling
from tokcomp_jax.models.llama import Llama

__all__ = ["ModelConfig", "RopeScaling", "Llama"]
