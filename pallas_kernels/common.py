"""What the kernel wrappers share: the choice of backend, the interpret flag and input checks.

Every kernel reads a layer's cache as a per-row pool of N slots (`keys`, `values`: `[B, N, D]`,
`positions`: `[B, N]`) in which KV head h owns `lengths[b, h]` entries from slot `starts[b, h]` on.
A uniform cache `[B, Hkv, C, D]` is the pool `[B, Hkv * C, D]` with `starts = h * C`; a cache with a
budget per KV head (AdaKV) is stored that way already. Checks run on shapes and dtypes only, before
anything is traced into a kernel, so that a wrong call raises a `ValueError` naming the argument.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

BACKENDS = ("gpu", "tpu")
SUPPORTED_HEAD_DIMS = (32, 64, 128, 256)
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def resolve_backend(backend: str | None, interpret: bool | None):
    """The backend's name and the `interpret` argument for `pallas_call`.

    backend None: "tpu" on a TPU, "gpu" elsewhere. interpret None: interpret when JAX runs on
    neither a GPU nor a TPU (the CPU, where the tests run). TPU kernels are interpreted with the
    TPU interpret mode (`pltpu.InterpretParams`), which models their memory spaces and grids.
    """
    platform = jax.default_backend()
    if backend is None:
        backend = "tpu" if platform == "tpu" else "gpu"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (or None to follow the device), got {backend!r}.")
    if interpret is None:
        interpret = platform not in ("gpu", "tpu")
    if not interpret:
        return backend, False
    return backend, pltpu.InterpretParams() if backend == "tpu" else True


def check_head_dim(head_dim: int) -> None:
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {head_dim} is not supported by the Pallas kernels (they take "
                         f"{SUPPORTED_HEAD_DIMS}); use attn_impl='xla' for this model.")


def check_block_size(name: str, value: int, multiple_of: int) -> None:
    """A block size must be a power of two and a multiple of the hardware tile."""
    if not isinstance(value, (int, np.integer)) or value < multiple_of or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {multiple_of}, got {value!r}.")


def check_dtypes(**arrays) -> jnp.dtype:
    """All floating inputs share one supported dtype; returns it."""
    dtypes = {name: jnp.dtype(x.dtype) for name, x in arrays.items()}
    first = next(iter(dtypes.values()))
    if any(d != first for d in dtypes.values()):
        listed = ", ".join(f"{name}: {d}" for name, d in dtypes.items())
        raise ValueError(f"{', '.join(dtypes)} must share one dtype, got {listed}; cast them to one of "
                         f"float32, bfloat16 or float16.")
    if first not in SUPPORTED_DTYPES:
        raise ValueError(f"{next(iter(dtypes))} has dtype {first}; the kernels take float32, bfloat16 or float16.")
    return first


def check_shape(name: str, x, shape: tuple, what: str) -> None:
    """`x.shape == shape`, else an error that says what the argument is."""
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must be {what}, shaped {tuple(shape)}; got {tuple(x.shape)}.")


def check_int(name: str, x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must hold integers (int32), got dtype {x.dtype}.")


def check_pool(keys, values, starts, lengths, positions=None) -> tuple[int, int, int, int]:
    """Checks a cache pool and returns (batch, slots, kv_heads, head_dim)."""
    if keys.ndim != 3:
        raise ValueError(f"keys must be a pool of slots shaped [B, N, D], got shape {tuple(keys.shape)}; "
                         f"reshape a [B, Hkv, C, D] cache to [B, Hkv * C, D] with starts = h * C.")
    batch, slots, head_dim = keys.shape
    check_head_dim(head_dim)
    check_shape("values", values, keys.shape, "the values of the keys' slots")
    if starts.ndim != 2 or starts.shape[0] != batch:
        raise ValueError(f"starts must be [B, Hkv] (first slot of each KV head), got shape {tuple(starts.shape)}.")
    check_shape("lengths", lengths, starts.shape, "the entries of each (row, KV head), like starts")
    check_int("starts", starts)
    check_int("lengths", lengths)
    if positions is not None:
        check_shape("positions", positions, keys.shape[:2], "each slot's token position")
        check_int("positions", positions)
    return batch, slots, starts.shape[1], head_dim


def segment_mask(starts: jax.Array, lengths: jax.Array, slots: int) -> jax.Array:
    """`[B, Hkv, N]`: slot n belongs to the segment of KV head h in row b."""
    n = jnp.arange(slots, dtype=jnp.int32)
    return (n >= starts[..., None]) & (n < (starts + lengths)[..., None])


def uniform_starts(batch: int, kv_heads: int, capacity: int) -> jax.Array:
    """`starts` of a uniform cache `[B, Hkv, C, D]` viewed as a pool `[B, Hkv * C, D]`."""
    return jnp.broadcast_to(jnp.arange(kv_heads, dtype=jnp.int32) * capacity, (batch, kv_heads))


def resolve_max_segment(max_segment: int | None, slots: int) -> int:
    """The most slots a segment holds (the caller's static promise; None: the whole pool), which
    sizes the kernels' grids per segment instead of per pool."""
    if max_segment is None:
        return slots
    if isinstance(max_segment, bool) or not isinstance(max_segment, (int, np.integer)) or not 1 <= max_segment <= slots:
        raise ValueError(f"max_segment must be an int in [1, N = {slots}] (the most slots a segment holds), "
                         f"got {max_segment!r}.")
    return int(max_segment)
