"""Pallas kernels for sparse and compressed attention.

One sub-package per op: `kernel.py` (Pallas GPU / Mosaic TPU), `reference.py` (pure jnp, the
oracle the kernel is tested against) and `__init__.py` (the jitted wrapper, block sizes and the
interpret flag that runs the kernel on CPU).
"""
