"""Tiny random models for tests and examples (users' own tests included), and the compiler options
that measure rematerialisation on CPU."""
from __future__ import annotations

import dataclasses

from flax import nnx

from tokcomp_jax.models.config import TINY_CONFIG
from tokcomp_jax.models.llama import Llama

# XLA's CPU compiler drops the barriers that keep a rematerialised layer's recomputation in the
# backward pass, and merges it back into the forward pass; compiled with these options
# (`jax.jit(f).lower(...).compile(KEEP_REMAT_ON_CPU)`), CPU keeps remat as TPUs do, and its memory can
# be measured.
KEEP_REMAT_ON_CPU = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def tiny_llama(seed: int = 0, dtype="float32", attn_impl: str = "xla", **overrides) -> Llama:
    """A randomly initialised 2-layer GQA Llama; `overrides` replace fields of `TINY_CONFIG` (the
    Pallas kernels take head dims from 32 on: `tiny_llama(attn_impl="pallas", head_dim=32)`)."""
    return Llama(dataclasses.replace(TINY_CONFIG, **overrides), dtype=dtype, rngs=nnx.Rngs(seed), attn_impl=attn_impl)
