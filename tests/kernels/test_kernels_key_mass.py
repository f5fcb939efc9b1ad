"""The key-mass Pallas kernel against its dense reference, on both backends in interpret mode.

Caches are pools (compressed old entries per KV head, then the current chunk's keys) with garbage
in the free slots; each query row's lse comes from a dense helper here. The non-interpreted kernels
are lowered for CUDA (Triton) and TPU (Mosaic) with `jax.export`, which needs no hardware.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import uniform_starts
from pallas_kernels.key_mass import key_mass, key_mass_reference
from tolerances import attention_mass_tolerance, gamma, reordered_sum, score_magnitude


@dataclasses.dataclass(frozen=True)
class Case:
    """kept[b][h]: old entries KV head h of row b keeps before the chunk; each row's chunk of T
    tokens starts with front_pad[b] padding tokens (weight 0, NaN queries, repeated position)."""
    name: str
    kept: tuple
    group: int = 2
    head_dim: int = 64
    tokens: int = 16
    front_pad: tuple | None = None
    append: bool = True  # segments end with the chunk's own keys
    packed: bool = False  # heads packed with gaps in reverse order, else a uniform cache
    decay: bool = False  # fractional weights
    gpu_blocks: tuple = (None, None)


CASES = [
    Case("tova_T1_gqa1", kept=((9, 4), (0, 13)), group=1, tokens=1),
    Case("gqa3_d128_odd_packed", kept=((23, 8),), group=3, head_dim=128, tokens=37, front_pad=(3,), packed=True,
         decay=True, gpu_blocks=(16, 16)),
    Case("gqa8", kept=((31,),), group=8, tokens=20),
    Case("lengths_0_1", kept=((0, 1, 6),), group=1, tokens=5, append=False, packed=True),
    Case("batch_padding_decay", kept=((5, 30), (17, 0), (40, 12)), tokens=24, front_pad=(0, 7, 23), decay=True,
         gpu_blocks=(16, 16)),
    Case("window_T64", kept=((600, 333),), group=4, head_dim=128, tokens=64, gpu_blocks=(64, 32)),
]


def dense_lse(q, keys, starts, lengths, positions, query_positions, scale):
    """[B, H, T] log-sum-exp of each query row's visible scores, -inf where it sees none."""
    group = q.shape[2] // starts.shape[1]
    slot = jnp.arange(keys.shape[1])
    owned = jnp.repeat((slot >= starts[..., None]) & (slot < (starts + lengths)[..., None]), group, axis=1)
    visible = owned[:, :, None, :] & (positions[:, None, None, :] <= query_positions[:, None, :, None])
    scores = jnp.einsum("bthd,bnd->bhtn", q.astype(jnp.float32), keys.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) * scale
    return jax.nn.logsumexp(jnp.where(visible, scores, -jnp.inf), axis=-1)


def make_inputs(case: Case, dtype, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    batch, kv_heads = len(case.kept), len(case.kept[0])
    heads, tokens = kv_heads * case.group, case.tokens
    pad = case.front_pad or (0,) * batch
    context = 2 * max(max(row) for row in case.kept) + 5  # positions before the chunk
    segments = [[np.concatenate([np.sort(rng.choice(context, old, replace=False)),
                                 context + np.arange(tokens - pad[b]) if case.append else []]).astype(np.int32)
                 for old in row] for b, row in enumerate(case.kept)]
    longest = max(len(s) for row in segments for s in row)
    if case.packed:
        gaps = rng.integers(0, 6, (batch, kv_heads))
        ends = np.cumsum((gaps + [[len(s) for s in row] for row in segments])[:, ::-1], axis=1)[:, ::-1]
        starts = ends - [[len(s) for s in row] for row in segments]
        slots = int(ends.max()) + 7
    else:
        capacity = longest + 3
        starts = np.asarray(uniform_starts(batch, kv_heads, capacity))
        slots = kv_heads * capacity
    keys = np.full((batch, slots, case.head_dim), np.nan, np.float32)
    positions = rng.integers(-2**31, 2**31 - 1, (batch, slots), dtype=np.int64).astype(np.int32)
    for b, row in enumerate(segments):
        for h, segment in enumerate(row):
            keys[b, starts[b, h]:starts[b, h] + len(segment)] = rng.standard_normal((len(segment), case.head_dim))
            positions[b, starts[b, h]:starts[b, h] + len(segment)] = segment
    lengths = np.array([[len(s) for s in row] for row in segments], np.int32)
    query_positions = context + np.maximum(np.arange(tokens)[None] - np.array(pad)[:, None], 0)
    weights = (np.arange(tokens)[None] >= np.array(pad)[:, None]).astype(np.float32)
    if case.decay:
        weights *= 0.9 ** (tokens - 1 - np.arange(tokens)) * rng.uniform(0.2, 1.0, (batch, tokens))
    q = rng.standard_normal((batch, tokens, heads, case.head_dim)) * 2
    q[np.arange(tokens)[None] < np.array(pad)[:, None]] = np.nan  # padding queries: weight 0, whatever they hold
    scale = case.head_dim ** -0.5
    inputs = dict(q=jnp.asarray(q, dtype),
                  keys=jnp.asarray(keys, dtype), starts=jnp.asarray(starts, jnp.int32),
                  lengths=jnp.asarray(lengths), positions=jnp.asarray(positions),
                  query_positions=jnp.asarray(query_positions, jnp.int32), query_weights=jnp.asarray(weights))
    lse_args = {k: inputs[k] for k in ("q", "keys", "starts", "lengths", "positions", "query_positions")}
    return dict(inputs, lse=dense_lse(**lse_args, scale=scale))


def mass_tolerance(inputs: dict, expected) -> float:
    """Kernel and reference take the same lse, so a probability differs by its score's error alone
    (`reordered_sum` over the head dim, relative, at the inputs' score magnitude); a slot's mass
    sums the T * G weighted probabilities of its queries (`reordered_sum` of them). bfloat16 inputs
    give the same bound: their products are exact in the float32 accumulators of both sides."""
    tokens, heads, head_dim = inputs["q"].shape[1:]
    group = heads // inputs["starts"].shape[1]
    magnitude = float(jnp.abs(expected).max())
    scores = score_magnitude(inputs["q"], inputs["keys"], head_dim ** -0.5)
    return reordered_sum(head_dim, magnitude * scores) + reordered_sum(tokens * group, magnitude)


def run_kernel(backend: str, case: Case, inputs: dict, **options):
    block_q, block_k = case.gpu_blocks if backend == "gpu" else (128, 128)
    return key_mass(**inputs, backend=backend, interpret=True, block_q=block_q, block_k=block_k, **options)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kernel_matches_reference(case, dtype, backend):
    inputs = make_inputs(case, dtype)
    expected = key_mass_reference(**inputs)
    mass = run_kernel(backend, case, inputs)
    assert mass.shape == inputs["positions"].shape and mass.dtype == jnp.float32
    assert np.isfinite(np.asarray(mass)).all()
    np.testing.assert_allclose(np.asarray(mass), np.asarray(expected), rtol=0, atol=mass_tolerance(inputs, expected))


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_probabilities_sum_to_one_per_query(backend):
    """Weights 1: a KV head's slots hold G * (its queries that see a key) of mass. Against that exact
    count one side carries error: half `attention_mass_tolerance` (the kernel's scores, the dense
    lse's scores and sum over the longest segment, the kernel's sum over T * G queries), and the
    sum over the head's slots here."""
    case = CASES[4]
    inputs = make_inputs(case, jnp.float32, seed=1)
    inputs["query_weights"] = jnp.ones_like(inputs["query_weights"])
    mass = run_kernel(backend, case, inputs)
    slot = jnp.arange(mass.shape[1])
    owned = (slot >= inputs["starts"][..., None]) & (slot < (inputs["starts"] + inputs["lengths"])[..., None])
    per_head = jnp.where(owned, mass[:, None, :], 0.0).sum(axis=-1)                        # [B, Hkv]
    seeing = jnp.isfinite(inputs["lse"]).reshape(*per_head.shape, -1).sum(axis=-1)         # [B, Hkv]
    tokens, heads, head_dim = inputs["q"].shape[1:]
    magnitude, longest = float(seeing.max()), int(inputs["lengths"].max())
    scores = score_magnitude(inputs["q"], inputs["keys"], head_dim ** -0.5)
    tolerance = (attention_mass_tolerance(longest, head_dim, tokens * heads // per_head.shape[1], magnitude, scores) / 2
                 + gamma(longest) * magnitude)
    np.testing.assert_allclose(np.asarray(per_head), np.asarray(seeing, np.float32), rtol=0, atol=tolerance)


MAX_SEGMENT_CASES = [
    # A uniform cache of 209 slots per head: head 1's segment touches three 128-slot blocks.
    Case("uniform", kept=((150, 190),), tokens=16),
    # Packed: the longest segment, 257 slots, touches cdiv(256, 128) + 1 = 3 TPU blocks.
    Case("packed", kept=((240, 20, 60),), tokens=17, packed=True),
]


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("case", MAX_SEGMENT_CASES, ids=[c.name for c in MAX_SEGMENT_CASES])
def test_max_segment_bounds_the_key_blocks(case, backend):
    inputs = make_inputs(case, jnp.float32)
    kv_heads = inputs["starts"].shape[1]
    max_segment = int(inputs["lengths"].max()) if case.packed else inputs["keys"].shape[1] // kv_heads
    mass = run_kernel(backend, case, inputs, max_segment=max_segment)
    expected = key_mass_reference(**inputs)
    np.testing.assert_allclose(np.asarray(mass), np.asarray(expected), rtol=0, atol=mass_tolerance(inputs, expected))


def _export_args(dtype, head_dim):
    batch, kv_heads, group, tokens, slots = 2, 2, 3, 50, 300
    shapes = dict(q=((batch, tokens, kv_heads * group, head_dim), dtype), keys=((batch, slots, head_dim), dtype),
                  starts=((batch, kv_heads), jnp.int32), lengths=((batch, kv_heads), jnp.int32),
                  positions=((batch, slots), jnp.int32), query_positions=((batch, tokens), jnp.int32),
                  query_weights=((batch, tokens), jnp.float32), lse=((batch, kv_heads * group, tokens), jnp.float32))
    return [jax.ShapeDtypeStruct(shape, d) for shape, d in shapes.values()]


@pytest.mark.parametrize("platform, backend, marker",
                         [("cuda", "gpu", "xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_lowers_without_hardware(platform, backend, marker, dtype, head_dim):
    """The Triton and Mosaic lowerings of the compiled (non-interpreted) kernel run on CPU."""
    fn = jax.jit(functools.partial(key_mass, max_segment=150 if head_dim == 128 else None, backend=backend,
                                   interpret=False))
    # Triton's custom call has no serialization guarantee; it is lowered all the same.
    triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    exported = jax.export.export(fn, platforms=[platform], disabled_checks=[triton])(*_export_args(dtype, head_dim))
    assert marker in exported.mlir_module()


def _bad(**changes):
    inputs = make_inputs(CASES[0], jnp.float32)
    options = {k: changes.pop(k) for k in ("block_q", "block_k", "backend", "max_segment") if k in changes}
    return {**inputs, **changes}, options


@pytest.mark.parametrize("changes, match", [
    (dict(q=jnp.zeros((2, 1, 4, 48)), keys=jnp.zeros((2, 32, 48))), "head dim 48"),
    (dict(block_q=24), "block_q"),
    (dict(block_k=100), "block_k"),
    (dict(block_k=64, backend="tpu"), "block_k"),
    (dict(q=jnp.zeros((2, 1, 2, 64), jnp.bfloat16)), "q, keys must share one dtype"),
    (dict(lse=jnp.zeros((2, 1, 2))), "lse"),
    (dict(lse=jnp.zeros((2, 2, 1), jnp.bfloat16)), "lse must be float32"),
    (dict(query_weights=jnp.ones((2, 3))), "query_weights"),
    (dict(q=jnp.zeros((2, 1, 3, 64))), "multiple of the 2 KV heads"),
    (dict(backend="cuda"), "backend"),
    (dict(max_segment=0), "max_segment must be an int in"),
    (dict(max_segment=35), "max_segment must be an int in"),
    (dict(max_segment=np.float32(8)), "max_segment must be an int in"),
], ids=["head_dim_48", "block_q_24", "block_k_100", "tpu_block_k_64", "dtypes", "lse_shape", "lse_dtype",
        "weights_shape", "heads_not_multiple", "unknown_backend", "max_segment_0", "max_segment_past_n",
        "max_segment_float"])
def test_bad_input_raises_before_tracing(changes, match):
    inputs, options = _bad(**changes)
    with pytest.raises(ValueError, match=match):
        key_mass(**inputs, interpret=True, **options)
