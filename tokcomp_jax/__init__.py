"""tokcomp_jax: token compression for LLMs and VLMs in JAX.

>>> import tokcomp_jax as tc
>>> model, tokenizer = tc.load("smollm2-135m-instruct")  # doctest: +SKIP
>>> logits, cache = tc.prefill(model, tokenizer.encode("Hello"))  # doctest: +SKIP
"""
from tokcomp_jax import testing
from tokcomp_jax.cache import KVCache, LayerCache
from tokcomp_jax.checkpoints import CheckpointError, Tokenizer, load
from tokcomp_jax.generation import Generation, decode, generate, generate_ids, pad_batch, prefill
from tokcomp_jax.models import Llama, ModelConfig
from tokcomp_jax.sampling import SamplingConfig

__version__ = "0.1.0"

__all__ = [
    "load", "prefill", "decode", "generate", "generate_ids", "pad_batch", "Generation",
    "KVCache", "LayerCache", "Llama", "ModelConfig", "Tokenizer", "SamplingConfig", "CheckpointError",
    "testing",
]
