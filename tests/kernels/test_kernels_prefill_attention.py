"""The prefill attention kernel against its jnp reference (both backends in interpret mode), against
plain causal attention, its Triton and Mosaic lowerings without hardware, and its input checks."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels.common import uniform_starts
from pallas_kernels.prefill_attention import prefill_attention, prefill_attention_reference
from pallas_kernels.prefill_attention.kernel import visible_stops
from tolerances import attention_tolerance, logsumexp_tolerance, roundoff, score_magnitude

BACKENDS = ("gpu", "tpu")


def small_blocks(backend: str, group: int) -> dict:
    """Each backend's smallest blocks, so that a case spans several query and key blocks."""
    if backend == "tpu":
        return dict(block_q=8, block_k=128)
    return dict(block_q=max(1, 16 // pl.next_power_of_2(group)), block_k=16)  # Triton: rows x D >= 16 x 16


def make_case(seed: int, *, lengths, group: int, head_dim: int, steps: int, past: int, dtype=jnp.float32,
              front_pad=None, pad_position: int = -1, capacity: int | None = None):
    """A compressed cache pool and a chunk of queries.

    Head (b, h) holds `lengths[b][h]` entries: a random subset of the earlier positions [0, past),
    then the chunk's own positions (or, when shorter than the chunk, a random subset of everything).
    Segments are packed with gaps of free slots holding NaN keys and values and garbage positions,
    or, with `capacity`, start at h * capacity (a uniform cache). Row b's first `front_pad[b]`
    tokens are padding, at `pad_position`.
    """
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    batch, kv_heads = lengths.shape
    front_pad = np.zeros(batch, int) if front_pad is None else np.asarray(front_pad)
    starts = np.zeros_like(lengths)
    for b in range(batch):
        cursor = int(rng.integers(0, 4))
        for h in range(kv_heads):
            starts[b, h] = cursor
            cursor += lengths[b, h] + int(rng.integers(0, 4))
    slots = int((starts + lengths).max()) + 3
    if capacity is not None:
        starts, slots = np.asarray(uniform_starts(batch, kv_heads, capacity)), kv_heads * capacity
    positions = rng.integers(-(2 ** 31), 2 ** 31 - 1, (batch, slots), dtype=np.int64).astype(np.int32)
    keys = np.full((batch, slots, head_dim), np.nan, np.float32)
    values = np.full((batch, slots, head_dim), np.nan, np.float32)
    query_positions = np.full((batch, steps), pad_position, np.int32)
    for b in range(batch):
        chunk = past + np.arange(steps - front_pad[b])
        query_positions[b, front_pad[b]:] = chunk
        for h in range(kv_heads):
            n, start = int(lengths[b, h]), int(starts[b, h])
            if n >= len(chunk):
                segment = np.concatenate([np.sort(rng.choice(past, n - len(chunk), replace=False)), chunk])
            else:
                segment = np.sort(rng.choice(past + len(chunk), n, replace=False))
            positions[b, start:start + n] = segment
            keys[b, start:start + n] = rng.standard_normal((n, head_dim))
            values[b, start:start + n] = rng.standard_normal((n, head_dim))
    q = rng.standard_normal((batch, steps, kv_heads * group, head_dim))
    return (jnp.asarray(q, dtype), jnp.asarray(keys, dtype), jnp.asarray(values, dtype), jnp.asarray(starts),
            jnp.asarray(lengths), jnp.asarray(positions), jnp.asarray(query_positions))


CASES = {
    # GQA 3, odd T and N, ragged compressed heads, NaN free slots, batch 2, T not a multiple of block_q.
    "gqa3_ragged": dict(seed=0, lengths=[[29, 13], [20, 170]], group=3, head_dim=64, steps=13, past=200),
    # GQA 8, head dim 128, a head with no entries and one with a single entry, one row padded at the front.
    "gqa8_d128_empty_heads": dict(seed=1, lengths=[[0, 1, 11]], group=8, head_dim=128, steps=7, past=30,
                                  front_pad=[2]),
    # MHA, one query (T = 1), lengths 0 and 1.
    "mha_single_query": dict(seed=2, lengths=[[1, 0, 6], [3, 1, 0]], group=1, head_dim=64, steps=1, past=9),
    # Padding tokens repeating position 0, rows padded differently.
    "front_padded_rows": dict(seed=3, lengths=[[40, 25], [33, 12]], group=2, head_dim=64, steps=11, past=60,
                              front_pad=[0, 5], pad_position=0),
}


def assert_matches(args, got, want, scale=None):
    """Output and lse equal the reference's up to `attention_tolerance` and `logsumexp_tolerance`
    over the longest segment, with the inputs' score magnitude and the largest Σ_n p_n·|v_n| of an
    output as value magnitude (the reference over |values|). In bfloat16 the output also carries the
    kernel's rounding of the probabilities to bfloat16 before the value product (one side:
    u·Σ p|v|) and each side's rounding of the output (one bfloat16 ulp of it); the scores and lse
    are float32 sums of exact products on both sides."""
    q, keys, values, _, lengths = args[:5]
    (out, lse), (ref_out, ref_lse) = got, want
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    assert lse.shape == ref_lse.shape and lse.dtype == jnp.float32
    keys_seen, head_dim = int(lengths.max()), q.shape[-1]
    scores = score_magnitude(q, keys, head_dim ** -0.5 if scale is None else scale)
    q32, keys32, abs_values = (x.astype(jnp.float32) for x in (q, keys, jnp.abs(values)))
    value_magnitude = float(prefill_attention_reference(q32, keys32, abs_values, *args[3:], scale=scale)[0].max())
    out, ref_out = np.asarray(out, np.float32), np.asarray(ref_out, np.float32)
    out_tol = attention_tolerance(keys_seen, head_dim, value_magnitude, scores)
    if q.dtype == jnp.bfloat16:
        out_tol += roundoff(jnp.bfloat16) * (value_magnitude + 2 * np.abs(ref_out).max())
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=out_tol)
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    seen = np.isfinite(ref_lse)
    lse_tol = logsumexp_tolerance(keys_seen, head_dim, scores, np.abs(ref_lse[seen]).max(initial=0.0))
    np.testing.assert_allclose(lse[seen], ref_lse[seen], rtol=0, atol=lse_tol)


# Every case in float32, the two GQA ones in bfloat16 too (interpret mode is slow).
DTYPED_CASES = [pytest.param(name, jnp.float32, id=f"{name}-f32") for name in CASES] + [
    pytest.param(name, jnp.bfloat16, id=f"{name}-bf16") for name in ("gqa3_ragged", "gqa8_d128_empty_heads")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, dtype", DTYPED_CASES)
def test_kernel_matches_reference(name, dtype, backend):
    args = make_case(**CASES[name], dtype=dtype)
    got = prefill_attention(*args, backend=backend, **small_blocks(backend, CASES[name]["group"]))
    assert_matches(args, got, prefill_attention_reference(*args))


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_blocks_match_reference(backend):
    args = make_case(**CASES["gqa3_ragged"])
    assert_matches(args, prefill_attention(*args, backend=backend, scale=0.3),
                   prefill_attention_reference(*args, scale=0.3), scale=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_causal_attention(backend):
    """A cache holding exactly the chunk, at positions 0..T-1: ordinary causal GQA attention (XLA's
    dense attention and a float32 logsumexp, other orders of the same sums: `attention_tolerance`
    and `logsumexp_tolerance` over the T keys)."""
    batch, steps, kv_heads, group, head_dim = 2, 37, 2, 4, 64
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in [(batch, steps, kv_heads * group, head_dim)] + 2 * [(batch, steps, kv_heads, head_dim)])
    pool = lambda x: x.transpose(0, 2, 1, 3).reshape(batch, kv_heads * steps, head_dim)  # noqa: E731
    positions = jnp.tile(jnp.arange(steps, dtype=jnp.int32), (batch, kv_heads))
    out, lse = prefill_attention(q, pool(k), pool(v), uniform_starts(batch, kv_heads, steps),
                                 jnp.full((batch, kv_heads), steps, jnp.int32), positions,
                                 jnp.tile(jnp.arange(steps, dtype=jnp.int32), (batch, 1)), backend=backend,
                                 **small_blocks(backend, group))
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    want_abs = jax.nn.dot_product_attention(q, k, jnp.abs(v), is_causal=True)  # Σ p|v|: the value magnitude
    scores_magnitude = score_magnitude(q.reshape(batch, steps * kv_heads * group, head_dim),
                                       k.reshape(batch, steps * kv_heads, head_dim), head_dim ** -0.5)
    np.testing.assert_allclose(out, want, rtol=0,
                               atol=attention_tolerance(steps, head_dim, jnp.abs(want_abs).max(), scores_magnitude))
    scores = jnp.einsum("bthgd,bshd->bhgts", q.reshape(batch, steps, kv_heads, group, head_dim), k,
                        precision=jax.lax.Precision.HIGHEST) * head_dim ** -0.5
    causal = jnp.tril(jnp.ones((steps, steps), bool))
    want_lse = jax.nn.logsumexp(jnp.where(causal, scores, -jnp.inf), axis=-1)
    np.testing.assert_allclose(lse, want_lse.reshape(batch, kv_heads * group, steps), rtol=0,
                               atol=logsumexp_tolerance(steps, head_dim, scores_magnitude, np.abs(want_lse).max()))


MAX_SEGMENT_CASES = {
    # A uniform cache of C = 200 slots per head: head 1's segment touches three 128-slot blocks.
    "uniform": (dict(seed=5, lengths=[[150, 200]], group=2, head_dim=64, steps=5, past=300, capacity=200), 200),
    # Ragged: the longest segment, 257 slots from slot 0..3, touches cdiv(256, 128) + 1 = 3 TPU blocks.
    "ragged": (dict(seed=6, lengths=[[257, 30, 100]], group=2, head_dim=64, steps=5, past=300), 257),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MAX_SEGMENT_CASES))
def test_max_segment_bounds_the_key_blocks(name, backend):
    case, max_segment = MAX_SEGMENT_CASES[name]
    args = make_case(**case)
    got = prefill_attention(*args, max_segment=max_segment, backend=backend, **small_blocks(backend, case["group"]))
    assert_matches(args, got, prefill_attention_reference(*args))


def test_visible_stops_bound_the_causal_prefix():
    """Query block i of a plain causal prefill needs only its head's first (i + 1) * block_q keys."""
    steps, block_q, kv_heads = 64, 16, 2
    starts = uniform_starts(1, kv_heads, steps)
    positions = jnp.tile(jnp.arange(steps, dtype=jnp.int32), (1, kv_heads))
    block_positions = jnp.arange(block_q - 1, steps, block_q, dtype=jnp.int32)[None]
    stops = visible_stops(starts, jnp.full((1, kv_heads), steps, jnp.int32), positions, block_positions, steps)
    want = starts[..., None] + jnp.arange(1, steps // block_q + 1) * block_q
    np.testing.assert_array_equal(stops, want)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_lowers_without_hardware(platform, dtype, head_dim):
    """The compiled kernel (interpret=False) lowers through Pallas Triton and Mosaic on a CPU machine."""
    batch, steps, heads, kv_heads, slots = 1, 100, 8, 2, 600
    args = [jax.ShapeDtypeStruct(shape, dtype) for shape in
            [(batch, steps, heads, head_dim), (batch, slots, head_dim), (batch, slots, head_dim)]]
    args += [jax.ShapeDtypeStruct(shape, jnp.int32) for shape in
             [(batch, kv_heads), (batch, kv_heads), (batch, slots), (batch, steps)]]
    fn = functools.partial(prefill_attention, max_segment=300 if head_dim == 128 else None,
                           backend="gpu" if platform == "cuda" else "tpu", interpret=False)
    # Triton's custom call carries no compatibility guarantee; that is about serializing, not lowering.
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)
    assert "prefill_attention" in exported.mlir_module()


def bad_inputs():
    q, keys, values, starts, lengths, positions, query_positions = make_case(**CASES["mha_single_query"])
    args = dict(q=q, keys=keys, values=values, starts=starts, lengths=lengths, positions=positions,
                query_positions=query_positions)
    pad48 = lambda x: jnp.zeros(x.shape[:-1] + (48,), x.dtype)  # noqa: E731
    return {
        "head_dim_48": (dict(args, q=pad48(q), keys=pad48(keys), values=pad48(values)), {}, "head dim 48"),
        "block_q_not_power_of_two": (args, dict(block_q=24), "block_q must be a power of two"),
        "block_k_not_power_of_two": (args, dict(block_k=48), "block_k must be a power of two"),
        "mixed_dtypes": (dict(args, values=values.astype(jnp.bfloat16)), {}, "must share one dtype"),
        "positions_shape": (dict(args, positions=positions[:, :-1]), {}, "positions must be"),
        "query_positions_shape": (dict(args, query_positions=query_positions[:1]), {}, "query_positions must be"),
        "heads_not_multiple": (dict(args, q=q[:, :, :2]), {}, "multiple of the pool's 3 KV heads"),
        "unknown_backend": (args, dict(backend="cuda"), "backend must be one of"),
        "max_segment_0": (args, dict(max_segment=0), "max_segment must be an int in"),
        "max_segment_past_n": (args, dict(max_segment=keys.shape[1] + 1), "max_segment must be an int in"),
        "max_segment_float": (args, dict(max_segment=4.0), "max_segment must be an int in"),
    }


@pytest.mark.parametrize("name", list(bad_inputs()))
def test_bad_input_raises_value_error(name):
    args, options, message = bad_inputs()[name]
    with pytest.raises(ValueError, match=message):
        prefill_attention(**args, **options)
