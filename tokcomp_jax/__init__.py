"""tokcomp_jax: token compression for LLMs and VLMs in JAX.

>>> import tokcomp_jax as tc
>>> model = tc.testing.tiny_llama()        # tc.load("smollm2-135m-instruct") for the real model
>>> logits, cache = tc.prefill(model, [[1, 2, 3], [4, 5]], capacity=8)
>>> logits.shape, cache.lengths.shape, cache.positions[0].shape
((2, 64), (2, 2, 2), (2, 2, 8))
"""
from tokcomp_jax import attention, compression, evaluation, learned, presses, testing, training
from tokcomp_jax.learned import tasks as _learned_tasks  # noqa: F401  (registers the training tasks "gist" and "icae")
from tokcomp_jax.cache import KVCache, LayerCache, RaggedLayerCache
from tokcomp_jax.checkpoints import CheckpointError, Tokenizer, load
from tokcomp_jax.generation import (Generation, NonFiniteError, answer_questions, decode, generate, generate_ids,
                                    pad_batch, prefill)
from tokcomp_jax.models import Llama, ModelConfig
from tokcomp_jax.sampling import SamplingConfig

__version__ = "0.1.0"

__all__ = [
    "load", "prefill", "decode", "generate", "generate_ids", "answer_questions", "pad_batch", "Generation",
    "KVCache", "LayerCache", "RaggedLayerCache", "Llama", "ModelConfig", "Tokenizer", "SamplingConfig",
    "CheckpointError", "NonFiniteError", "attention", "compression", "evaluation", "learned", "presses", "testing",
    "training",
]
