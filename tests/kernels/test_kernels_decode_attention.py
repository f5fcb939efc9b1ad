"""Split-K decode attention (and its per-slot probabilities) equals the dense reference on both
backends in interpret mode; both kernels lower for real hardware (Triton for CUDA, Mosaic for TPU);
bad input raises a ValueError before anything is traced."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.decode_attention as decode
from pallas_kernels.common import uniform_starts
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from tolerances import attention_mass_tolerance, attention_tolerance, roundoff, score_magnitude


def assert_matches(args, got, expected):
    """Output and probabilities (if given) equal the reference's up to `attention_tolerance` and
    `attention_mass_tolerance` over the longest segment, with the inputs' score magnitude, the
    largest Σ_n p_n·|v_n| of an output as value magnitude (the reference over |values|) and the G
    query heads summed per slot. In bfloat16 the output also carries the kernel's rounding of the
    probabilities to bfloat16 before the value product (one side: u·Σ p|v|) and each side's
    rounding of the output (one bfloat16 ulp of it)."""
    q, keys, values, starts, lengths = args
    keys_seen, head_dim, group = int(lengths.max()), q.shape[-1], q.shape[1] // starts.shape[1]
    scores = score_magnitude(q, keys, head_dim ** -0.5)
    q32, keys32, abs_values = (x.astype(jnp.float32) for x in (q, keys, jnp.abs(values)))
    value_magnitude = float(jnp.abs(decode_attention_reference(q32, keys32, abs_values, starts, lengths)).max())
    (out, probs), (expected_out, expected_probs) = got, expected
    out, expected_out = np.asarray(out, np.float32), np.asarray(expected_out, np.float32)
    out_tolerance = attention_tolerance(keys_seen, head_dim, value_magnitude, scores)
    if q.dtype == jnp.bfloat16:
        out_tolerance += roundoff(jnp.bfloat16) * (value_magnitude + 2 * np.abs(expected_out).max())
    np.testing.assert_allclose(out, expected_out, rtol=0, atol=out_tolerance)
    if probs is not None:
        probs_tolerance = attention_mass_tolerance(keys_seen, head_dim, group, np.abs(expected_probs).max(), scores)
        np.testing.assert_allclose(probs, expected_probs, rtol=0, atol=probs_tolerance)


# Small blocks so that the segments span several blocks and several splits.
BLOCK_K = {"gpu": 32, "tpu": 128}


def _pool(rng, *, batch, kv_heads, group, dim, starts, lengths, slots, dtype):
    """q, keys, values of a pool of `slots`; NaN in every slot outside the segments."""
    starts, lengths = np.asarray(starts, np.int32), np.asarray(lengths, np.int32)
    keys = rng.normal(size=(batch, slots, dim)).astype(np.float32)
    values = rng.normal(size=(batch, slots, dim)).astype(np.float32)
    inside = np.zeros((batch, slots), bool)
    for b, h in np.ndindex(starts.shape):
        inside[b, starts[b, h]:starts[b, h] + lengths[b, h]] = True
    keys[~inside] = np.nan
    values[~inside] = np.nan
    q = rng.normal(size=(batch, kv_heads * group, dim)).astype(np.float32)
    q, keys, values = (jnp.asarray(x, dtype) for x in (q, keys, values))
    return q, keys, values, jnp.asarray(starts), jnp.asarray(lengths)


def _uniform(rng, *, batch, kv_heads, group, dim, capacity, lengths, dtype):
    return _pool(rng, batch=batch, kv_heads=kv_heads, group=group, dim=dim, slots=kv_heads * capacity,
                 starts=uniform_starts(batch, kv_heads, capacity), lengths=lengths, dtype=dtype)


CASES = {
    # GQA 3, head dim 64: full, empty, single-token and odd lengths in a uniform cache (N = 400).
    "gqa3_f32": lambda rng: _uniform(rng, batch=2, kv_heads=2, group=3, dim=64, capacity=200,
                                     lengths=[[200, 0], [1, 137]], dtype=jnp.float32),
    # MHA, head dim 128: random lengths per (row, KV head).
    "mha_random_lengths_f32": lambda rng: _uniform(rng, batch=2, kv_heads=3, group=1, dim=128, capacity=150,
                                                   lengths=rng.integers(0, 151, size=(2, 3)), dtype=jnp.float32),
    # GQA 8, head dim 128: a ragged pool with unequal segments, head 1 before head 0 in row 1,
    # segments that start and end inside blocks (TPU: six blocks, two per split, a block shared by
    # two heads), and NaN in the free slots between them.
    "gqa8_ragged_bf16": lambda rng: _pool(rng, batch=2, kv_heads=2, group=8, dim=128, slots=900,
                                          starts=[[5, 720], [131, 0]], lengths=[[700, 97], [640, 130]],
                                          dtype=jnp.bfloat16),
}


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("case", list(CASES))
def test_decode_attention_equals_the_reference(backend, case):
    args = CASES[case](np.random.default_rng(len(case)))
    out, probs = decode_attention(*args, return_probs=True, block_k=BLOCK_K[backend], num_splits=3,
                                  backend=backend, interpret=True)
    expected_out, expected_probs = decode_attention_reference(*args, return_probs=True)
    assert out.dtype == args[0].dtype and probs.dtype == jnp.float32
    assert_matches(args, (out, probs), (expected_out, expected_probs))
    assert np.isfinite(np.asarray(probs)).all() and np.isfinite(np.asarray(out, np.float32)).all()


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_plain_decode_with_default_blocks(backend):
    """No probabilities, default block size and splits, a pool that is no multiple of the block."""
    args = _uniform(np.random.default_rng(3), batch=1, kv_heads=2, group=4, dim=64, capacity=333,
                    lengths=[[333, 70]], dtype=jnp.float32)
    out = decode_attention(*args, backend=backend, interpret=True)
    assert_matches(args, (out, None), (decode_attention_reference(*args), None))


MAX_SEGMENT_CASES = {
    # Uniform: segments of C = 200 slots; head 1's (slots 200..399) touches three 128-slot blocks.
    "uniform": lambda rng: (_uniform(rng, batch=2, kv_heads=2, group=3, dim=64, capacity=200,
                                     lengths=[[200, 200], [0, 131]], dtype=jnp.float32), 200),
    # Ragged: the longest segment, 257 slots from slot 127, touches cdiv(256, 128) + 1 = 3 TPU blocks.
    "ragged": lambda rng: (_pool(rng, batch=1, kv_heads=3, group=2, dim=64, slots=1000, starts=[[127, 700, 450]],
                                 lengths=[[257, 40, 130]], dtype=jnp.float32), 257),
}


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("case", list(MAX_SEGMENT_CASES))
def test_max_segment_bounds_the_blocks(backend, case):
    """With max_segment the TPU grid spans a segment's blocks, not the pool's, and nothing is lost."""
    args, max_segment = MAX_SEGMENT_CASES[case](np.random.default_rng(5))
    out, probs = decode_attention(*args, return_probs=True, max_segment=max_segment, block_k=BLOCK_K[backend],
                                  num_splits=2, backend=backend, interpret=True)
    assert_matches(args, (out, probs), decode_attention_reference(*args, return_probs=True))


def test_entries_past_max_segment_are_ignored():
    """A length over max_segment is cut to it: the NaN slots after the segment are never read."""
    q, keys, values, starts, lengths = MAX_SEGMENT_CASES["ragged"](np.random.default_rng(6))[0]
    out, probs = decode_attention(q, keys, values, starts, lengths.at[0, 0].add(43), return_probs=True,
                                  max_segment=257, block_k=128, num_splits=2, backend="tpu", interpret=True)
    args = (q, keys, values, starts, lengths)
    assert_matches(args, (out, probs), decode_attention_reference(*args, return_probs=True))


def _abstract(dtype, dim, batch=2, kv_heads=2, group=3, slots=600):
    index = jax.ShapeDtypeStruct((batch, kv_heads), jnp.int32)
    pool = jax.ShapeDtypeStruct((batch, slots, dim), dtype)
    return jax.ShapeDtypeStruct((batch, kv_heads * group, dim), dtype), pool, pool, index, index


@pytest.mark.parametrize("backend,platform", [("gpu", "cuda"), ("tpu", "tpu")])
@pytest.mark.parametrize("dtype,dim", [(jnp.float32, 64), (jnp.bfloat16, 128)])
@pytest.mark.parametrize("return_probs", [False, True])
def test_kernels_lower_for_the_hardware(backend, platform, dtype, dim, return_probs):
    """The non-interpreted kernel goes through the Triton / Mosaic lowering (no device needed)."""
    fn = functools.partial(decode_attention, return_probs=return_probs, max_segment=300 if return_probs else None,
                           backend=backend, interpret=False)
    triton_call = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=[triton_call])(
        *_abstract(dtype, dim))
    assert ("xla.gpu.triton" if backend == "gpu" else "tpu_custom_call") in exported.mlir_module()


def _no_trace(*args, **kwargs):
    raise AssertionError("the kernel was traced before the arguments were checked")


@pytest.mark.parametrize("change,match", [
    (dict(dim=48), "head dim 48"),
    (dict(block_k=100), "block_k must be a power of two"),
    (dict(block_k=64, backend="tpu"), "block_k must be a power of two >= 128"),
    (dict(num_splits=0), "num_splits must be an int >= 1"),
    (dict(max_segment=0), "max_segment must be an int in"),
    (dict(max_segment=101), "max_segment must be an int in"),
    (dict(max_segment=50.0), "max_segment must be an int in"),
    (dict(keys_dtype=jnp.float32), "must share one dtype"),
    (dict(lengths_shape=(2, 3)), "lengths must be"),
    (dict(heads=5), "multiple of the 2 KV heads"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_bad_input_raises_before_tracing(monkeypatch, change, match):
    monkeypatch.setattr(decode, "_decode_attention", _no_trace)
    dim, heads = change.pop("dim", 64), change.pop("heads", 6)
    q = jnp.zeros((2, heads, dim), jnp.bfloat16)
    keys = jnp.zeros((2, 100, dim), change.pop("keys_dtype", jnp.bfloat16))
    values = jnp.zeros((2, 100, dim), jnp.bfloat16)
    lengths = jnp.zeros(change.pop("lengths_shape", (2, 2)), jnp.int32)
    with pytest.raises(ValueError, match=match):
        decode_attention(q, keys, values, jnp.zeros((2, 2), jnp.int32), lengths, interpret=True, **change)
