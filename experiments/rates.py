"""What a benchmark measures its results against: the machine, XLA's float32 GEMM rate on it, and
the FLOPs of a causal prefill."""
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np


def machine_description() -> str:
    """The machine and JAX's backend, for the first line of a benchmark's output."""
    return (f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
            f"jax {jax.__version__} backend {jax.default_backend()}")


def gemm_rate(rows: int, config, repeats: int = 5) -> float:
    """FLOP/s of XLA's float32 matrix product on this machine, at the shapes of the model's MLP
    (`rows` tokens), best of `repeats`."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((rows, config.hidden_size)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((config.hidden_size, config.intermediate_size)), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * rows * config.hidden_size * config.intermediate_size / best


def prefill_flops(config, tokens: int) -> tuple[float, float]:
    """(matrix-product FLOPs, attention FLOPs) of a causal prefill of `tokens` tokens: every layer's
    projections and MLP per token, and QK^T and PV over the causal half of the [tokens, tokens] scores
    (the LM head runs on the last token only)."""
    c = config
    per_token = (c.hidden_size * c.num_heads * c.head_dim * 2 + c.hidden_size * c.num_kv_heads * c.head_dim * 2
                 + 3 * c.hidden_size * c.intermediate_size)
    linear = 2.0 * tokens * per_token * c.num_layers + 2.0 * c.hidden_size * c.vocab_size
    attention = 2 * 2.0 * c.num_heads * c.head_dim * tokens * (tokens + 1) / 2 * c.num_layers
    return linear, attention
