"""The gist task in the trainer, trained compressors as files, continuation scoring, and the
evaluation script (tiny byte-level Llama)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import filelock
import jax
import ml_collections
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import tokcomp_jax as tc
from tokcomp_jax.evaluation import continuation_nll
from tokcomp_jax.evaluation.perplexity import token_nll
from tokcomp_jax.learned.artifacts import SCALE, export_trained, load_trained, pack, unpack
from tokcomp_jax.learned.gist import gist_logits, gist_press
from tokcomp_jax.learned.icae import icae_logits, lora_encoder
from tokcomp_jax.training import ConfigError, Trainer, read_metrics, train
from tokcomp_jax.training.checkpoint import Checkpoints
from tolerances import gamma, log_probability, model_tolerance, reordered_sum, roundoff
from training_worker import tiny_config
from conftest import ROOT

CONTEXT, GISTS = 48, 6


def gist_config(**gist):
    config = tiny_config({"steps": 8, "checkpoint.every": 4, "trainable": "lora", "lora.rank": 4,
                          "optim.warmup_steps": 0})
    config.task = "gist"
    config.gist = ml_collections.ConfigDict({"num_tokens": GISTS, "context_tokens": CONTEXT, **gist})
    return config


@pytest.fixture(scope="module")
def gist_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gist_run")
    train(gist_config(), str(workdir))
    path = export_trained(str(workdir), str(workdir / "gist.safetensors"))
    return workdir, path


def test_gist_task_trains_the_gists_and_adapters(gist_run):
    workdir, _ = gist_run
    losses = [record["loss"] for record in read_metrics(str(workdir / "metrics.jsonl"))]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.2
    trainer = Trainer(gist_config())
    state = Checkpoints(str(workdir / "checkpoints"), max_to_keep=2).restore(8, trainer.abstract_state())
    initial = trainer.init_state()
    assert set(state["trained"]["task"]) == {"embeddings"}
    assert state["trained"]["task"]["embeddings"].shape == (GISTS, trainer.frozen["embed_tokens"]["embedding"].shape[1])
    assert not np.allclose(state["trained"]["task"]["embeddings"], initial["trained"]["task"]["embeddings"])
    lora_b = state["trained"]["model"]["layers"][0]["self_attn"]["q_proj"]["lora"]["lora_b"]
    assert np.abs(np.asarray(lora_b)).max() > 0  # B starts at zero


def assert_rounded_as_stored(loaded, trained):
    """`loaded` (arrays as `load_trained` gives them) is `trained` as the default storage rounds it:
    LoRA factors within half their row's int8 step max|row| / 127 (float32 products add < 2**-12
    steps), other floating parameters within bfloat16's unit roundoff 2**-8, relative."""
    loaded = dict(jax.tree_util.tree_leaves_with_path(loaded))
    trained = dict(jax.tree_util.tree_leaves_with_path(trained))
    assert loaded.keys() == trained.keys()
    for path, value in trained.items():
        value, got = np.asarray(value), np.asarray(loaded[path])
        assert got.dtype == np.float32
        if str(path[-1].key).endswith(("lora_a", "lora_b")):
            bound = (0.5 + 2**-12) * np.abs(value).max(axis=-1, keepdims=True) / 127
        else:
            bound = roundoff(ml_dtypes.bfloat16) * np.abs(value)
        assert np.all(np.abs(got - value) <= bound), jax.tree_util.keystr(path)
        assert not np.array_equal(got, value), jax.tree_util.keystr(path)  # stored smaller than float32


def test_an_exported_compressor_loads_into_the_model_and_gists_that_trained(gist_run, tmp_path):
    workdir, path = gist_run
    assert Path(path).stat().st_size < 200_000  # adapters and gists only, no optimizer state
    trainer = Trainer(gist_config())
    state = Checkpoints(str(workdir / "checkpoints"), max_to_keep=2).restore(8, trainer.abstract_state())
    batch = trainer.batch(0)
    expected, _ = trainer.loss_fn(state["trained"], trainer.frozen, batch)

    trained = load_trained(path)
    assert trained.config.task == "gist" and trained.task_params.num_tokens == GISTS
    assert_rounded_as_stored(nnx.to_pure_dict(nnx.state(trained.task_params, nnx.Param)), state["trained"]["task"])
    lora_b = state["trained"]["model"]["layers"][0]["self_attn"]["q_proj"]["lora"]["lora_b"]
    assert_rounded_as_stored({"lora_b": unpack(load_file(path))["model/layers/0/self_attn/q_proj/lora/lora_b"]},
                             {"lora_b": lora_b})
    # Stored as trained (float32, as in files written before bfloat16 storage), the loss is the run's.
    exact = load_trained(export_trained(str(workdir), str(tmp_path / "float32.safetensors"), storage="float32"))
    loss, _ = tc.training.make_task(exact.config).loss(exact.model, exact.task_params, batch)
    # The trainer's (jitted, adapters apart) and the loaded model's (adapters merged) forward of the
    # same parameters: the network's bound on the logits, then a mean cross-entropy of the rows'
    # continuations.
    context, continuation = batch["ids"][:, :CONTEXT], batch["ids"][:, CONTEXT:]
    logits = np.asarray(gist_logits(exact.model, exact.task_params, context, continuation))
    steps = CONTEXT + GISTS + continuation.shape[1]
    tolerance = (log_probability(model_tolerance(exact.model.config, steps, np.abs(logits).max()), logits.shape[-1])
                 + reordered_sum(continuation.size, expected))
    np.testing.assert_allclose(float(loss), float(expected), atol=tolerance, rtol=0)

    # The trained gists compress a prompt through tc.generate's press.
    context = np.asarray(batch["ids"][:2, :CONTEXT])
    _, cache = tc.prefill(trained.model, context, press=gist_press(trained.task_params), capacity=CONTEXT + 4)
    assert cache.lengths[0].tolist() == [[GISTS] * cache.lengths[0].shape[1]] * 2


def test_export_needs_a_finished_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        export_trained(str(tmp_path), str(tmp_path / "x.safetensors"))


def test_each_storage_packs_and_unpacks_within_its_rounding():
    rng = np.random.default_rng(0)
    arrays = {"model/q_proj/lora/lora_a": rng.normal(size=(5, 4)).astype(np.float32),
              "model/q_proj/lora/lora_b": np.array([[0.0] * 3, [1e-3, -2.0, 0.5]], np.float32),
              "task/embeddings": rng.normal(size=(2, 3)).astype(np.float32), "task/ids": np.arange(3)}
    as_trained = unpack(pack(arrays, "float32"))
    assert as_trained.keys() == arrays.keys() and all(np.array_equal(v, arrays[k]) for k, v in as_trained.items())
    bfloat16 = unpack(pack(arrays, "bfloat16"))
    for key, value in arrays.items():
        assert bfloat16[key].dtype == value.dtype
        assert np.all(np.abs(bfloat16[key] - value) <= roundoff(ml_dtypes.bfloat16) * np.abs(value))
    packed = pack(arrays)
    lora_b = "model/q_proj/lora/lora_b"
    assert packed[lora_b].dtype == np.int8 and packed[lora_b + SCALE].shape == (2, 1)
    assert packed["task/embeddings"].dtype.name == "bfloat16" and packed["task/ids"].dtype == arrays["task/ids"].dtype
    assert unpack(packed).keys() == arrays.keys()
    assert_rounded_as_stored({k: v for k, v in unpack(packed).items() if k != "task/ids"},
                             {k: v for k, v in arrays.items() if k != "task/ids"})
    assert np.array_equal(unpack(packed)[lora_b][0], np.zeros(3))
    with pytest.raises(ValueError, match="storage='float16'"):
        pack(arrays, "float16")


@pytest.mark.parametrize("change, field", [
    ({"num_tokens": 0}, "config.gist.num_tokens"),
    ({"context_tokens": 64}, "config.data.window"),
    ({"context_tokens": None}, "config.gist.context_tokens"),
])
def test_bad_gist_fields_fail_before_anything_loads(change, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        Trainer(gist_config(**change))


def test_the_gist_task_needs_its_fields():
    config = tiny_config({})
    config.task = "gist"
    with pytest.raises(ConfigError, match=r"config\.gist = ml_collections"):
        Trainer(config)


def test_continuation_nll_from_a_cache_equals_one_pass_over_the_window():
    model = tc.testing.tiny_llama()
    ids = np.random.default_rng(0).integers(0, 64, (3, 20))
    logits, _ = tc.prefill(model, ids, all_logits=True)
    oracle = np.asarray(token_nll(logits, ids))[:, 12:]  # continuation tokens 2..8
    _, cache = tc.prefill(model, ids[:, :12], capacity=20)
    # Cached keys against one pass over the 20 tokens: the network's bound on the logits.
    tolerance = log_probability(model_tolerance(model.config, 20, np.abs(np.asarray(logits)).max()),
                                model.config.vocab_size)
    np.testing.assert_allclose(continuation_nll(model, ids[:, 12:], cache), oracle, atol=tolerance, rtol=0)
    alone, _ = tc.prefill(model, ids[:, 12:], all_logits=True)
    # Without a cache, the same prefill of the same tokens: the same program, bit for bit.
    np.testing.assert_array_equal(continuation_nll(model, ids[:, 12:]), np.asarray(token_nll(alone, ids[:, 12:])))


def eval_compressors(path, output, presses: str, batch_size: int = 4) -> str:
    """experiments/eval_compressors.py on 5 windows; its stdout."""
    run = subprocess.run([sys.executable, "experiments/eval_compressors.py", f"--compressors={path}",
                          f"--presses={presses}", "--max_windows=5", f"--batch_size={batch_size}",
                          f"--output={output}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_eval_script_scores_every_method_on_held_out_windows(gist_run, tmp_path):
    _, path = gist_run
    eval_compressors(path, tmp_path, "streaming_llm,knorm")
    (result,) = json.loads((tmp_path / "results.json").read_text())
    assert result["windows"] == 5 and result["budget"] == GISTS and result["ratio"] == CONTEXT / GISTS
    assert set(result["nll"]) == {"no context", "full context", "streaming_llm", "knorm", "no context, trained model",
                                 "gist (trained)"}
    assert all(np.isfinite(v) for v in result["nll"].values())
    for name, values in result["window_nll"].items():
        # The JSON's windows are rounded to 6 decimals; its mean is float32's of the 5 unrounded.
        bound = 0.5e-6 + gamma(5) * abs(result["nll"][name])
        assert len(values) == 5 and abs(np.mean(values) - result["nll"][name]) <= bound
    report = (tmp_path / "results.md").read_text()
    best = min(["streaming_llm", "knorm"], key=result["nll"].get)
    assert f"| {best} | " in report and "(best press)" in report.split(f"| {best} | ")[1].splitlines()[0]
    assert [line.split(":")[0] for line in report.splitlines() if line.startswith("- ")] == [
        f"- gist 8x ({Path(path).name}) / {best}", f"- gist 8x ({Path(path).name}) / no context"]

    # Evaluated again into the same directory, the base model's scores are reused, not recomputed.
    again = eval_compressors(path, tmp_path, "knorm")
    reused = [line.split(":")[0].split()[-1] for line in again.splitlines() if line.endswith("(reused)")]
    assert reused == ["context", "context", "knorm"]  # no context, full context, knorm
    (second,) = json.loads((tmp_path / "results.json").read_text())
    assert second["window_nll"]["knorm"] == result["window_nll"]["knorm"] and "streaming_llm" not in second["nll"]

    # So are they for a file whose run read the same held-out windows but trained differently.
    with safe_open(path, "np") as f:
        metadata, arrays = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    config = json.loads(metadata["config"])
    config["data"]["shift_windows"] = True
    shifted = str(tmp_path / "shifted.safetensors")
    save_file(arrays, shifted, metadata={**metadata, "config": json.dumps(config)})
    third = eval_compressors(shifted, tmp_path, "knorm")
    assert [line.split(":")[0].split()[-1] for line in third.splitlines() if line.endswith("(reused)")] == [
        "context", "context", "knorm"]


COMMITTED = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "compressors").glob("*.safetensors"))


@pytest.fixture(scope="session")
def committed_results(tmp_path_factory):
    """experiments/eval_compressors.py on every committed compressor in one run, which loads
    SmolLM2 and compiles its programs once for all of them; the first test worker to ask runs it,
    the others read its results (a lock in the directory xdist's workers share)."""
    run_directory = tmp_path_factory.getbasetemp()  # under xdist, a worker's directory inside the run's
    if "PYTEST_XDIST_WORKER" in os.environ:
        run_directory = run_directory.parent
    shared = run_directory / "committed_compressors"
    shared.mkdir(exist_ok=True)
    with filelock.FileLock(str(shared / "lock")):
        if not (shared / "results.json").exists():
            # No press (the test asserts none), and the 5 windows in one batch: each method compiles once.
            eval_compressors(",".join(COMMITTED), shared, "", batch_size=5)
    return {result["file"]: result for result in json.loads((shared / "results.json").read_text())}


@pytest.mark.slow(reason="one run scores the four committed compressors on SmolLM2: the first test runs it")
@pytest.mark.parametrize("path", COMMITTED)
def test_committed_compressors_carry_their_context_on_held_out_essays(path, committed_results):
    result = committed_results[path]
    nll = result["nll"]
    assert nll["full context"] < nll[f"{result['task']} (trained)"] < nll["no context"] - 0.3
    assert result["setup"]["model"]["name"] == "smollm2-135m-instruct"


@pytest.mark.parametrize("memory", ["embeddings", "kv"])
def test_a_trained_icae_exports_and_compresses_as_it_trained(tmp_path, memory):
    config = tiny_config({"task": "icae", "trainable": "none", "steps": 2, "checkpoint.every": 2, "lora.rank": 4,
                          "optim.warmup_steps": 0})
    config.icae = ml_collections.ConfigDict({"num_slots": 4, "context_tokens": CONTEXT, "ae_weight": 0.5,
                                             "memory": memory})
    train(config, str(tmp_path / "run"))
    trained = load_trained(export_trained(str(tmp_path / "run"), str(tmp_path / "icae.safetensors"),
                                          storage="float32"))
    assert trained.task_params.icae.memory == memory
    trainer = Trainer(config)
    state = Checkpoints(str(tmp_path / "run" / "checkpoints"), max_to_keep=2).restore(2, trainer.abstract_state())
    batch = trainer.batch(0)
    expected, _ = trainer.loss_fn(state["trained"], trainer.frozen, batch)
    loss, _ = tc.training.make_task(trained.config).loss(trained.model, trained.task_params, batch)
    # The trainer's and the loaded model's forward of the same parameters, through the encoder's
    # layers and the decoder's: the network's bound on the logits (of the continuation; the
    # autoencoding forward runs the same decoder), then means of cross-entropies over the rows.
    context, continuation = batch["ids"][:, :CONTEXT], batch["ids"][:, CONTEXT:]
    encoder = lora_encoder(trained.model, trained.task_params.adapters, config.lora.alpha / config.lora.rank)
    logits = np.asarray(icae_logits(encoder, trained.model, trained.task_params.icae, context, continuation))
    steps = CONTEXT + 2 * config.icae.num_slots + 1
    logits_tolerance = 2 * model_tolerance(trained.model.config, steps, np.abs(logits).max())
    tolerance = log_probability(logits_tolerance, logits.shape[-1]) + reordered_sum(context.size, expected)
    np.testing.assert_allclose(float(loss), float(expected), atol=tolerance, rtol=0)
    assert np.any(np.asarray(trained.task_params.adapters["layers"][0]["self_attn"]["q_proj"]["lora"]["lora_b"]))
    # In the default storage, the encoder's adapters and the ICAE tokens come back as it rounds them.
    small = load_trained(export_trained(str(tmp_path / "run"), str(tmp_path / "small.safetensors")))
    assert_rounded_as_stored(nnx.to_pure_dict(nnx.state(small.task_params, nnx.Param)), state["trained"]["task"])
