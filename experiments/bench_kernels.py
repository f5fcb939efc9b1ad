"""The Pallas kernels against their XLA references and full-cache attention, side by side.

1. Decode over a compressed cache: a cache of S tokens per KV head of which each head keeps
   (1 - ratio) S entries (its `lengths`; the memory is allocated for S, so only the kernel's
   skipping saves time). Columns: the kernel, the kernel emitting each key's probability, the XLA
   reference (dense, masked), and the kernel on the full cache (ratio 0); bytes read are the kept
   keys and values; bandwidth is bytes read / time, also as a fraction of the device's copy
   bandwidth (an array copy's read + written bytes / time, measured first).
2. Window scoring (the last `window_size` queries against S keys, per-key mass) against the
   prefill attention of S tokens, one layer.
3. Prefill attention (causal, returns lse) against the XLA reference where its score matrix fits.

Times are medians of `repeats` calls after a warm-up call (compilation), with block_until_ready.
Absolute times hold for the device printed first.

  python experiments/bench_kernels.py --config=configs/bench_kernels.py
"""
import functools
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app
from ml_collections import config_flags

from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.decode_attention.reference import decode_attention_reference
from pallas_kernels.prefill_attention import prefill_attention
from pallas_kernels.prefill_attention.reference import prefill_attention_reference
from pallas_kernels.window_scores import window_scores

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)


def median_seconds(fn, *args, repeats: int) -> float:
    """Median wall time of `fn(*args)` over `repeats` calls after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(mib: int, repeats: int) -> float:
    """Bytes per second of an on-device array copy (read + written)."""
    x = jnp.ones((mib << 18,), jnp.float32)
    seconds = median_seconds(jax.jit(lambda x: x + 1.0), x, repeats=repeats)
    return 2 * x.nbytes / seconds


def normal(key, shape, dtype) -> jax.Array:
    """Standard normal values made on the device."""
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def cache(key, batch: int, kv_heads: int, length: int, dim: int, dtype, kept: int):
    """A pool of `kv_heads` segments of `length` slots each, `kept` of them valid per head."""
    key_keys, key_values = jax.random.split(key)
    keys = normal(key_keys, (batch, kv_heads * length, dim), dtype)
    values = normal(key_values, (batch, kv_heads * length, dim), dtype)
    starts = jnp.broadcast_to(jnp.arange(kv_heads, dtype=jnp.int32) * length, (batch, kv_heads))
    lengths = jnp.full((batch, kv_heads), kept, jnp.int32)
    positions = jnp.broadcast_to(jnp.tile(jnp.arange(length, dtype=jnp.int32), kv_heads), (batch, kv_heads * length))
    return keys, values, starts, lengths, positions


def bench_decode(config, key, dtype, bandwidth: float) -> None:
    c = config
    print(f"\n1. decode, H={c.num_heads} Hkv={c.num_kv_heads} D={c.head_dim} {c.dtype}; times in ms, "
          f"bandwidth in GB/s and as a fraction of the copy bandwidth")
    print(f"{'B':>3} {'S':>7} {'ratio':>5} {'cache MB':>9} {'kernel':>8} {'+probs':>8} {'xla':>8} "
          f"{'GB/s':>7} {'of copy':>7} {'probs/plain':>11} {'xla/kernel':>10} {'kernel/full':>11}")
    itemsize = jnp.dtype(dtype).itemsize
    reference = jax.jit(decode_attention_reference)
    for batch in c.batch_sizes:
        for length in c.lengths:
            plain = jax.jit(functools.partial(decode_attention, max_segment=length))
            with_probs = jax.jit(functools.partial(decode_attention, max_segment=length, return_probs=True))
            full = None
            for ratio in sorted(c.ratios):
                kept = max(1, int(length * (1 - ratio)))
                key, key_cache, key_q = jax.random.split(key, 3)
                keys, values, starts, lengths, _ = cache(key_cache, batch, c.num_kv_heads, length, c.head_dim, dtype,
                                                         kept)
                q = normal(key_q, (batch, c.num_heads, c.head_dim), dtype)
                args = (q, keys, values, starts, lengths)
                kernel = median_seconds(plain, *args, repeats=c.repeats)
                probs = median_seconds(with_probs, *args, repeats=c.repeats)
                scores_bytes = batch * c.num_heads * keys.shape[1] * 4
                xla = (median_seconds(reference, *args, repeats=c.repeats)
                       if scores_bytes <= c.reference_max_bytes else float("nan"))
                full = kernel if ratio == 0 or full is None else full
                read = 2 * batch * c.num_kv_heads * kept * c.head_dim * itemsize
                print(f"{batch:>3} {length:>7} {ratio:>5.2f} {read / 1e6:>9.1f} {kernel * 1e3:>8.3f} "
                      f"{probs * 1e3:>8.3f} {xla * 1e3:>8.3f} {read / kernel / 1e9:>7.3g} "
                      f"{read / kernel / bandwidth:>7.3g} {probs / kernel:>11.2f} {xla / kernel:>10.2f} "
                      f"{kernel / full:>11.2f}", flush=True)


def bench_window_and_prefill(config, key, dtype) -> None:
    c = config
    length = c.window_prefill_length
    print(f"\n2. window scoring of the last {c.window_size} queries vs the prefill attention of {length} tokens "
          f"(one layer, batch 1); times in ms")
    key_cache, key_q = jax.random.split(key)
    keys, values, starts, lengths, positions = cache(key_cache, 1, c.num_kv_heads, length, c.head_dim, dtype, length)
    q = normal(key_q, (1, length, c.num_heads, c.head_dim), dtype)
    query_positions = jnp.arange(length, dtype=jnp.int32)[None]
    window = c.window_size
    weights = jnp.full((1, window), 1.0 / window, jnp.float32)
    pool = (keys, values, starts, lengths, positions)
    scoring = median_seconds(jax.jit(functools.partial(window_scores, max_segment=length)), q[:, -window:], *pool,
                             query_positions[:, -window:], weights, repeats=c.repeats)
    prefill = median_seconds(jax.jit(functools.partial(prefill_attention, max_segment=length)), q, *pool,
                             query_positions, repeats=c.repeats)
    print(f"{'window':>8} {'prefill':>9} {'window/prefill':>14}")
    print(f"{scoring * 1e3:>8.3f} {prefill * 1e3:>9.3f} {scoring / prefill:>14.4f}", flush=True)

    print("\n3. prefill attention (causal, GQA, with lse), batch 1; times in ms")
    print(f"{'S':>7} {'kernel':>9} {'xla':>9} {'xla/kernel':>10}")
    for length in c.prefill_lengths:
        key_cache, key_q = jax.random.split(jax.random.fold_in(key, length))
        keys, values, starts, lengths, positions = cache(key_cache, 1, c.num_kv_heads, length, c.head_dim, dtype,
                                                         length)
        q = normal(key_q, (1, length, c.num_heads, c.head_dim), dtype)
        args = (q, keys, values, starts, lengths, positions, jnp.arange(length, dtype=jnp.int32)[None])
        kernel = median_seconds(jax.jit(functools.partial(prefill_attention, max_segment=length)), *args,
                                repeats=c.repeats)
        fits = c.num_heads * length * keys.shape[1] * 4 <= c.reference_max_bytes
        xla = median_seconds(jax.jit(prefill_attention_reference), *args, repeats=c.repeats) if fits else float("nan")
        print(f"{length:>7} {kernel * 1e3:>9.3f} {xla * 1e3:>9.3f} {xla / kernel:>10.2f}", flush=True)


def main(argv):
    del argv
    config = _CONFIG.value
    device = jax.devices()[0]
    interpreted = jax.default_backend() not in ("gpu", "tpu")
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}"
          + (" -- interpret mode: times say nothing about the kernels' speed" if interpreted else ""))
    bandwidth = copy_bandwidth(config.copy_mib, config.repeats)
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s ({config.copy_mib} MiB array, read + written)")
    key_decode, key_prefill = jax.random.split(jax.random.PRNGKey(config.seed))
    dtype = jnp.dtype(config.dtype)
    bench_decode(config, key_decode, dtype, bandwidth)
    bench_window_and_prefill(config, key_prefill, dtype)


if __name__ == "__main__":
    app.run(main)
