"""tokcomp_jax: token compression for LLMs and VLMs in JAX."""
from setuptools import find_packages, setup

setup(
    name="tokcomp_jax",
    version="0.1.0",
    description="Token compression (KV-cache, visual, prompt, learned) for LLMs and VLMs in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tokcomp_jax", "tokcomp_jax.*", "pallas_kernels", "pallas_kernels.*"]),
    install_requires=[
        "jax>=0.10,<0.12",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "numpy>=1.26",
        "absl-py>=2.1",
        "gguf>=0.17",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "jinja2>=3.1",
        "ml-collections>=1.0",
        "jaxtyping>=0.2.36",
        "tqdm>=4.66",
        "matplotlib>=3.8",
    ],
    extras_require={
        # Reference implementations for parity tests (PyTorch CPU).
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "pytest-rerunfailures>=14",  # reruns a test once whose worker XLA crashed (tests/conftest.py)
            "hypothesis>=6.100",
            "filelock",  # the lock of the XLA compilation cache tests may share (tests/conftest.py)
            "torch==2.13.0",
            "transformers>=4.56,<5.3",
            "accelerate>=1.0,<2",
            "kvpress==0.5.5",
        ],
    },
    entry_points={"console_scripts": ["tokcomp-jax=tokcomp_jax.cli:run"]},
)
