"""Where a prefill's time goes on this machine, for docs/performance.md: per context length, the last
512-token chunk of a prefill (the most expensive: it sees the whole cache) timed and counted by XLA's
cost analysis, one layer's parts (the blockwise attention, the dense attention it replaced, the
MLP, the projections) timed alone, a decode step, the float32 GEMM rate at the MLP's shapes, and
the compilation of the chunk's program against the number of layers (the layers are unrolled).
XLA's cost analysis counts the body of a loop once, so its FLOPs leave out most of the blockwise
attention (a loop over blocks); the FLOP model counts it.

  python experiments/profile_prefill.py --config=configs/profile_prefill.py
"""
import dataclasses
import json
import os
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from flax import nnx
from ml_collections import config_flags

import tokcomp_jax as tc
from rates import gemm_rate, machine_description, prefill_flops
from tokcomp_jax.blockwise_attention import blockwise_attend
from tokcomp_jax.generation import _forward_jit

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)


def best_seconds(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls of `fn` (after one untimed call that compiles)."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def last_chunk(model, length: int, chunk: int, rng) -> tuple:
    """The arguments of `_forward_jit` for the last `chunk` tokens of a `length`-token prompt: the
    cache holds the first `length - chunk` tokens."""
    ids = rng.integers(0, model.config.vocab_size, (1, length)).astype(np.int32)
    cache = (tc.prefill(model, ids[:, :length - chunk], capacity=length)[1] if length > chunk
             else model.init_cache(1, length))
    graphdef, state = nnx.split(model)
    return graphdef, state, jnp.asarray(ids[:, length - chunk:]), cache, jnp.ones((1, chunk), bool), False


def layer_parts(model, cache, chunk: int, repeats: int, rng) -> dict:
    """Seconds of one layer's parts on a `chunk`-token chunk over layer 0 of `cache` (whose last
    `chunk` slots are the chunk's)."""
    c = model.config
    block = model.layers[0]
    layer = cache.layers[0]
    x = jnp.asarray(rng.standard_normal((1, chunk, c.hidden_size)), jnp.float32)
    queries = jnp.asarray(rng.standard_normal((1, chunk, c.num_heads, c.head_dim)), jnp.float32)
    positions = (jnp.arange(chunk, dtype=jnp.int32) + layer.capacity - chunk)[None]
    full = tc.LayerCache(layer.keys, layer.values, jnp.broadcast_to(jnp.arange(layer.capacity, dtype=jnp.int32),
                                                                    layer.positions.shape),
                         jnp.full(layer.lengths.shape, layer.capacity, jnp.int32))
    graphdef, state = nnx.split(block)

    def projections(graphdef, state, x):
        attn = nnx.merge(graphdef, state).self_attn
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), attn.o_proj(x)

    def mlp(graphdef, state, x):
        return nnx.merge(graphdef, state).mlp(x)

    parts = {
        "blockwise attention": (jax.jit(blockwise_attend), (queries, full, positions)),
        "dense attention": (jax.jit(tc.attention.attend), (queries, full, positions)),
        "q, k, v, o projections": (jax.jit(projections, static_argnums=0), (graphdef, state, x)),
        "MLP": (jax.jit(mlp, static_argnums=0), (graphdef, state, x)),
    }
    return {name: best_seconds(lambda f=f, a=a: f(*a), repeats) for name, (f, a) in parts.items()}


def compile_seconds(model, length: int, chunk: int, rng) -> float:
    """Seconds to trace, lower and compile the last chunk's program."""
    args = last_chunk(model, length, chunk, rng)
    start = time.perf_counter()
    _forward_jit.lower(*args).compile()
    return time.perf_counter() - start


def main(argv):
    del argv
    config = _CONFIG.value
    model, _ = tc.load(config.model, dtype=config.dtype)
    c, chunk, rng = model.config, config.chunk, np.random.default_rng(0)
    rate = gemm_rate(chunk, c)
    print(machine_description())
    print(f"{config.model} {config.dtype}: {c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} heads "
          f"({c.num_kv_heads} KV) of {c.head_dim}, MLP {c.intermediate_size}; XLA float32 GEMM rate "
          f"{rate / 1e9:.0f} GFLOP/s ({chunk} rows)")
    rows = []
    for length in config.lengths:
        args = last_chunk(model, length, chunk, rng)
        compiled = _forward_jit.lower(*args).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        dynamic = args[1:5]  # the compiled program takes the arguments that are not static
        seconds = best_seconds(lambda: compiled(*dynamic), config.repeats)
        _, cache = tc.prefill(model, np.zeros((1, length), np.int32), capacity=length + 1)
        decode = best_seconds(lambda: tc.decode(model, jnp.zeros((1,), jnp.int32), cache)[0], config.repeats)
        linear, attention = prefill_flops(c, length)
        linear_before, attention_before = prefill_flops(c, length - chunk)
        chunk_linear, chunk_attention = linear - linear_before, attention - attention_before
        chunk_flops = chunk_linear + chunk_attention
        parts = layer_parts(model, args[3], chunk, config.repeats, rng)
        row = {"length": length, "chunk_seconds": seconds, "xla_flops": float(cost.get("flops", float("nan"))),
               "xla_bytes": float(cost.get("bytes accessed", float("nan"))), "model_linear_flops": chunk_linear,
               "model_attention_flops": chunk_attention,
               "decode_step_seconds": decode, "layer_parts_seconds": parts}
        rows.append(row)
        print(f"\ncontext {length}: last {chunk}-token chunk {seconds:.3f} s, XLA counts {row['xla_flops'] / 1e9:.1f} "
              f"GFLOP and {row['xla_bytes'] / 1e9:.2f} GB (FLOP model: {chunk_linear / 1e9:.1f} GFLOP of projections "
              f"and MLP, {chunk_attention / 1e9:.1f} of causal attention; {chunk_flops / seconds / 1e9:.0f} GFLOP/s); "
              f"a decode step {1e3 * decode:.1f} ms")
        for name, part in parts.items():
            print(f"  one layer, {name:<24} {1e3 * part:8.2f} ms (x{c.num_layers}: {c.num_layers * part:.3f} s)")
    print("\ncompilation of the last chunk's program (SmolLM2's shapes, random weights) against layers:")
    compiles = []
    for layers in config.compile_layers:
        small = tc.Llama(dataclasses.replace(c, num_layers=layers), dtype=config.dtype, rngs=nnx.Rngs(0))
        seconds = compile_seconds(small, config.compile_length, chunk, rng)
        compiles.append({"layers": layers, "seconds": seconds})
        print(f"  {layers:>3} layers: {seconds:.2f} s")
    if config.output:
        os.makedirs(os.path.dirname(config.output) or ".", exist_ok=True)
        with open(config.output, "w", encoding="utf-8") as f:
            json.dump({"command": shlex.join(["python", *sys.argv]), "machine": machine_description(),
                       "gemm_flops_per_second": rate, "rows": rows, "compile": compiles}, f, indent=1)
        print(f"numbers: {config.output}")


if __name__ == "__main__":
    app.run(main)
