"""Training: a tiny run, exact resumption after SIGKILL, gradient accumulation, LoRA, task plug-ins,
sharded runs on 8 fake CPU devices (subprocesses: tests/training_worker.py), config errors."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tokcomp_jax.testing import tiny_llama
from tokcomp_jax.training import (ByteTokenizer, CheckpointError, Checkpoints, ConfigError, Task, Trainer, decay_mask,
                                  read_metrics, register_task, train)
from tokcomp_jax.training.loop import check_same_run
from tokcomp_jax.training.metrics import MetricsLog
from tokcomp_jax.training.tasks import lm_windows
from tolerances import log_probability, model_tolerance, reordered_sum, roundoff, training_losses
from training_worker import logits_magnitude, model_config, tiny_config
from conftest import ROOT, TESTS

WORKER = str(TESTS / "training_worker.py")
RUN = {"steps": 20, "checkpoint.every": 3, "checkpoint.max_to_keep": 2}


def losses(workdir: Path) -> list[float]:
    return [record["loss"] for record in read_metrics(str(workdir / "metrics.jsonl")) if "loss" in record]


def steps(workdir: Path) -> list[int]:
    return [record["step"] for record in read_metrics(str(workdir / "metrics.jsonl"))]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
    """20 uninterrupted steps of configs/train_tiny.py, checkpointed every 3."""
    workdir = tmp_path_factory.mktemp("run_a")
    train(tiny_config(RUN), str(workdir))
    return workdir


def test_tiny_run_learns_logs_each_step_and_keeps_max_to_keep_checkpoints(run_a):
    records = read_metrics(str(run_a / "metrics.jsonl"))
    assert [record["step"] for record in records] == list(range(1, 21))
    assert {"loss", "grad_norm", "lr", "tokens_per_s", "accuracy"} <= set(records[0])
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    lrs = [record["lr"] for record in records]  # 3 warmup updates to 3e-3, cosine decay to 3e-4
    # optax's float32 schedule: a few roundings of u each; at the end, cos's error of u at pi, which
    # the cosine's weight (1 - 0.1) carries relative to the end value 0.1 of the peak.
    u = roundoff(np.float32)
    assert lrs[:3] == pytest.approx([1e-3, 2e-3, 3e-3], rel=6 * u, abs=0)
    assert lrs[-1] == pytest.approx(3e-4, rel=6 * u + 0.9 / 0.1 * u, abs=0)
    assert sorted(os.listdir(run_a / "checkpoints")) == ["18", "20"]
    assert json.loads((run_a / "config.json").read_text())["steps"] == 20


def test_held_out_evaluation_logs_the_held_out_loss_and_leaves_training_unchanged(run_a, tmp_path):
    config = tiny_config({**RUN, "eval_every": 8, "eval_batches": 2})
    state = train(config, str(tmp_path))
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    evaluations = [record for record in records if "eval_loss" in record]
    assert [record["step"] for record in evaluations] == [8, 16, 20]  # and after the last update
    assert set(evaluations[0]) == {"step", "eval_loss", "eval_accuracy"}
    assert losses(tmp_path) == losses(run_a)
    # The last evaluation is the final parameters' mean loss over the first 2 held-out batches.
    trainer = Trainer(config)
    held_out = lm_windows(config, trainer.tokenizer, "held_out")
    train_rows = {row.tobytes() for step in range(20) for row in trainer.data.batch(step)["ids"]}
    expected, batches = [], [held_out.batch(index)["ids"] for index in range(2)]
    for rows in batches:
        assert not {row.tobytes() for row in rows} & train_rows
        expected.append(float(trainer.loss_fn(state["trained"], trainer.frozen, {"ids": jnp.asarray(rows)})[0]))
    # The trainer's jitted loss against the loss function run op by op: the network's bound on the
    # logits, a mean cross-entropy over the batch's tokens, and the float32 mean of the 2 batches.
    window, tokens = config.data.window, config.batch_size * (config.data.window - 1)
    logits = model_tolerance(model_config(config), window - 1, logits_magnitude(config, [state["trained"]], batches))
    tolerance = (log_probability(logits, model_config(config).vocab_size) + reordered_sum(tokens, np.mean(expected))
                 + reordered_sum(2, np.mean(expected)))
    assert evaluations[-1]["eval_loss"] == pytest.approx(np.mean(expected), abs=tolerance, rel=0)
    assert evaluations[0]["eval_loss"] > evaluations[-1]["eval_loss"]
    with pytest.raises(ConfigError, match=r"config\.eval_batches is 100000, .* ask for at most \d+"):
        train(tiny_config({**RUN, "eval_every": 8, "eval_batches": 100000}), str(tmp_path / "too_many"))
    assert not (tmp_path / "too_many").exists()  # before anything runs


def test_killed_run_resumes_exactly_where_it_stopped(run_a, tmp_path):
    workdir = tmp_path / "b"
    checkpoints = workdir / "checkpoints"
    run = [sys.executable, WORKER, "run", str(workdir), json.dumps(RUN)]
    log = tmp_path / "killed.log"
    with open(log, "w") as stderr:
        killed = subprocess.Popen(run + ["8"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 120
    while not ((workdir / "blocked").exists() and (checkpoints / "6").is_dir()):  # after step 8, saved step 6
        assert killed.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the run did not reach step 8"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert steps(workdir) == list(range(1, 9))
    # A save killed before Orbax finalised it leaves a temporary directory: resuming ignores it.
    unfinished = checkpoints / "9.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(checkpoints / "6", unfinished)
    for path in unfinished.rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    assert Checkpoints(str(checkpoints), max_to_keep=2).latest_step() == 6

    resumed = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert steps(workdir) == list(range(1, 21))
    assert losses(workdir) == losses(run_a)  # bit for bit, steps 7 to 20 included
    assert sorted(os.listdir(checkpoints)) == ["18", "20"]

    trainer = Trainer(tiny_config(RUN))
    restored = [Checkpoints(str(path / "checkpoints"), max_to_keep=2).restore(20, trainer.abstract_state())
                for path in (workdir, run_a)]
    jax.tree.map(np.testing.assert_array_equal, *restored)


def truncate(path: Path) -> None:
    """Cuts `path` to a third of its bytes, as a full disk or a killed copy leaves it."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def largest_array_file(checkpoint: Path) -> Path:
    return max((p for p in (checkpoint / "default").rglob("d/*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["array file", "metadata"])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(run_a, tmp_path, damage,
                                                                                        caplog):
    workdir = tmp_path / "run"
    shutil.copytree(run_a, workdir)
    newest = workdir / "checkpoints" / "20"
    truncate(largest_array_file(newest) if damage == "array file" else newest / "default" / "_METADATA")
    with caplog.at_level(logging.WARNING, logger="tokcomp_jax.training.checkpoint"):
        train(tiny_config(RUN), str(workdir))
    assert steps(workdir) == list(range(1, 21))
    assert losses(workdir) == losses(run_a)  # steps 19 and 20 again from step 18's checkpoint, bit for bit
    assert sorted(os.listdir(workdir / "checkpoints")) == ["18", "20"]
    assert os.listdir(workdir / "damaged_checkpoints") == ["20"]  # set aside, not deleted
    assert "checkpoint 20 does not restore" in caplog.text and "resuming from step 18" in caplog.text


def test_a_run_whose_checkpoints_all_fail_to_restore_names_each_and_moves_none(run_a, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(run_a, workdir)
    for step in ("18", "20"):
        truncate(largest_array_file(workdir / "checkpoints" / step))
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*checkpoints restores \(step 20: .*; step 18: "):
        train(tiny_config(RUN), str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["18", "20"]
    assert not (workdir / "damaged_checkpoints").exists()


def test_gradient_accumulation_equals_one_big_batch():
    """Two accumulated half batches update the parameters as the whole batch does, up to float32
    summation order. Adam's eps is set far above the gradients, so that its first update
    g / (|g| + eps) moves with g: with eps = 1e-8 it is sign(g), which flips wherever summation order
    alone moves a gradient across zero. A gradient sums over the batch's tokens, in two orders
    here: `reordered_sum(tokens, ...)` relative to each update, and to the largest one where
    gradients cancel; plus one float32 spacing of the parameter, to which each update is rounded."""
    def one_update(accum_steps):
        trainer = Trainer(tiny_config({"batch_size": 4, "grad_accum_steps": accum_steps, "optim.warmup_steps": 0,
                                       "optim.eps": 1.0}))
        state, batch = trainer.init_state(), trainer.batch(0)
        before = jax.device_get(state["trained"])
        state, metrics = trainer.step(state, batch)
        tokens = max(x.size for x in jax.tree.leaves(batch))
        updates = jax.tree.map(np.subtract, jax.device_get(state["trained"]), before)
        return before, updates, jax.device_get(metrics), tokens

    (before, big, big_metrics, tokens), (_, accumulated, accumulated_metrics, _) = one_update(1), one_update(2)
    rtol = reordered_sum(tokens, 1.0)
    largest = max(float(np.abs(x).max()) for x in jax.tree.leaves(big))
    assert largest > 0

    def check(a, b, parameter):
        bound = rtol * (np.abs(b) + largest) + np.spacing(np.abs(parameter) + np.abs(b))
        assert np.all(np.abs(a - b) <= bound), np.max(np.abs(a - b) - bound)
    jax.tree.map(check, accumulated, big, before)
    for name in ("loss", "grad_norm", "accuracy"):  # means and a norm of the same sums over the tokens
        np.testing.assert_allclose(accumulated_metrics[name], big_metrics[name], rtol=rtol, atol=0)


def test_lora_trains_adapters_only_and_starts_from_the_base_model(run_a):
    trainer = Trainer(tiny_config({**RUN, "trainable": "lora", "lora.targets": ("q_proj", "v_proj")}))
    state = trainer.init_state()
    before = jax.device_get(state["trained"]["model"])
    base = jax.device_get(trainer.frozen)
    history = []
    for step in range(3):
        state, metrics = trainer.step(state, trainer.batch(step))
        history.append(float(metrics["loss"]))
    assert history[0] == losses(run_a)[0]  # B = 0: the base model's loss, exactly
    assert history[-1] < history[0]

    jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer.frozen), base)
    jax.tree.map(np.testing.assert_array_equal, base, nnx.to_pure_dict(nnx.state(tiny_llama(seed=0, vocab_size=264))))
    after = jax.device_get(state["trained"]["model"])
    for layer in (0, 1):
        attention = after["layers"][layer]["self_attn"]
        assert sorted(attention) == ["q_proj", "v_proj"] and sorted(after["layers"][layer]) == ["self_attn"]
        for name in ("q_proj", "v_proj"):
            lora, initial = attention[name]["lora"], before["layers"][layer]["self_attn"][name]["lora"]
            assert not np.any(initial["lora_b"]) and np.any(lora["lora_b"])
            assert not np.array_equal(lora["lora_a"], initial["lora_a"])
    # The optimizer holds two moments of the adapters, and step counts.
    moments = [x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim]
    assert sum(moments) == 2 * sum(x.size for x in jax.tree.leaves(after))


class LogitBias(nnx.Module):
    """A task's own module: a learned bias on the logits."""

    def __init__(self, vocab_size: int):
        self.bias = nnx.Param(jnp.zeros((vocab_size,)))


def logit_bias_loss(model, module, batch):
    ids = batch["ids"]
    inputs = ids[:, :-1]
    logits, _, _ = model(inputs, model.init_cache(*inputs.shape), jnp.ones(inputs.shape, bool))
    return optax.softmax_cross_entropy_with_integer_labels(logits + module.bias[...], ids[:, 1:]).mean(), {}


def logit_bias_task(config):
    return Task(init=lambda config, model, tokenizer: LogitBias(model.config.vocab_size), loss=logit_bias_loss,
                data=lm_windows, extra_axes={"bias": ("vocab",)}, no_decay=("bias",))


register_task("test_logit_bias", logit_bias_task)


def test_a_registered_task_trains_its_own_module_with_the_model_frozen():
    trainer = Trainer(tiny_config({"task": "test_logit_bias", "trainable": "none", "compute_dtype": "bfloat16"}))
    state = trainer.init_state()
    assert trainer.frozen["layers"][0]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    for step in range(2):
        state, metrics = trainer.step(state, trainer.batch(step))
    trained = jax.device_get(state["trained"])
    assert trained["model"] == {} and trained["task"]["bias"].dtype == np.float32 and np.any(trained["task"]["bias"])
    assert np.isfinite(float(metrics["loss"]))
    register_task("test_logit_bias", logit_bias_task)  # the same factory again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        register_task("test_logit_bias", lambda config: None)


def test_sharded_runs_match_one_device(run_a, tmp_path):
    # Without LLVM's optimisations, which only slow the compilation down here: XLA still partitions
    # the programs for each mesh.
    flags = (f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8 "
             "--xla_backend_optimization_level=0").strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "KUBERNETES_"))}
    env.update(XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    layouts = {"8": {"data": 8}, "2x2x2": {"data": 2, "fsdp": 2, "tensor": 2}}
    overrides = {**RUN, "checkpoint.every": 100}  # one save, at the end
    run = subprocess.run([sys.executable, WORKER, "layouts", str(tmp_path), json.dumps(overrides), json.dumps(layouts)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["devices"] == 8
    # The meshes sum the gradients and the layers' products in other orders: `training_losses`, with
    # the logits' magnitude at the first and the last update.
    config = tiny_config(RUN)
    trainer = Trainer(config)
    ends = [trainer.init_state()["trained"], Checkpoints(str(run_a / "checkpoints"), max_to_keep=2).restore(
        config.steps, trainer.abstract_state())["trained"]]
    batches = [trainer.data.batch(0)["ids"], trainer.data.batch(config.steps - 1)["ids"]]
    magnitude = logits_magnitude(config, ends, batches)
    window = config.data.window
    tolerance = training_losses(model_config(config), window - 1, config.batch_size * (window - 1), losses(run_a),
                                magnitude)
    for name in layouts:
        np.testing.assert_array_less(np.abs(np.subtract(result["losses"][name], losses(run_a))), tolerance)
    # A checkpoint saved on one mesh restores onto another, exactly.
    assert result["restored_shardings_kept"] and result["restored_difference"] == 0


@pytest.mark.parametrize("overrides, field", [
    ({"task": "no_such_task"}, "config.task"),
    ({"optim.lr": 0.0}, "config.optim.lr"),
    ({"optim.lr": -1e-3}, "config.optim.lr"),
    ({"grad_accum_steps": 3}, "config.grad_accum_steps"),
    ({"trainable": "qlora"}, "config.trainable"),
    ({"trainable": "lora", "lora.targets": ("q_proj", "qq_proj")}, "config.lora.targets"),
    ({"compute_dtype": "float16"}, "config.compute_dtype"),
    ({"trainable": "none"}, "config.trainable"),
    ({"eval_every": -1}, "config.eval_every"),
    ({"eval_batches": 0}, "config.eval_batches"),
    ({"init_from": "no_such_run"}, "config.init_from"),
])
def test_bad_config_values_fail_before_anything_runs(tmp_path, overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        train(tiny_config(overrides), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_init_from_starts_from_another_runs_trained_parameters_with_a_new_optimizer_state(run_a, tmp_path):
    config = tiny_config({**RUN, "steps": 3, "optim.warmup_steps": 1, "init_from": str(run_a)})
    trainer = Trainer(config)
    state = trainer.init_state()
    newest = Checkpoints(str(run_a / "checkpoints"), max_to_keep=2).restore(20, trainer.abstract_state())
    jax.tree.map(np.testing.assert_array_equal, state["trained"], newest["trained"])
    assert not any(np.any(leaf) for leaf in jax.tree.leaves(state["opt_state"]))  # zero moments, zero count
    train(config, str(tmp_path / "warm"))
    assert losses(tmp_path / "warm")[0] < losses(run_a)[0] - 1.0  # starts where run_a ended, not afresh
    with pytest.raises(ConfigError, match=r"config\.init_from: the checkpoint at step 20 .* holds other trained "
                                          r"parameters than this run's: model/embed_tokens/embedding, "):
        Trainer(tiny_config({**RUN, "trainable": "lora", "init_from": str(run_a)})).init_state()


def test_shift_windows_shifts_the_training_windows_only():
    config, tokenizer = tiny_config({"data.shift_windows": True}), ByteTokenizer()
    train_windows, held_out = lm_windows(config, tokenizer, "train"), lm_windows(config, tokenizer, "held_out")
    assert train_windows.windows.shift and not held_out.windows.shift
    unshifted = lm_windows(tiny_config({}), tokenizer, "held_out")
    np.testing.assert_array_equal(held_out.batch(0)["ids"], unshifted.batch(0)["ids"])


def test_bad_mesh_fails_before_the_model_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.mesh: .*3 devices"):
        Trainer(tiny_config({"mesh.data": 3}))


def test_cli_reports_a_bad_field_without_a_traceback(tmp_path):
    run = subprocess.run([sys.executable, "experiments/train.py", "--config=configs/train_tiny.py",
                          f"--workdir={tmp_path / 'run'}", "--config.optim.lr=-0.1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "config.optim.lr must be a number > 0, got -0.1" in run.stderr and "Traceback" not in run.stderr


def test_resumed_metrics_drop_later_steps_and_cut_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": step, "loss": 1.0}) + "\n" for step in range(1, 9)) + '{"step": 9, "lo')
    log = MetricsLog(str(path), resume_step=6)
    log.write({"step": 7, "loss": 0.5})
    assert [record["step"] for record in read_metrics(str(path))] == [1, 2, 3, 4, 5, 6, 7]


def test_weight_decay_skips_vectors_and_new_token_embeddings():
    params = {"model": {"q_proj": {"kernel": np.ones((2, 2)), "bias": np.ones(2)}, "norm": {"weight": np.ones(2)}},
              "task": {"gist_tokens": np.ones((3, 2))}}
    assert decay_mask(params, no_decay=("gist_tokens",)) == {
        "model": {"q_proj": {"kernel": True, "bias": False}, "norm": {"weight": False}}, "task": {"gist_tokens": False}}


def test_a_run_resumes_only_with_a_config_that_computes_the_same(tmp_path):
    (tmp_path / "config.json").write_text(tiny_config(RUN).to_json())
    check_same_run(tiny_config({**RUN, "mesh.data": 1, "checkpoint.every": 5, "log_every": 2,
                                   "eval_every": 5}), str(tmp_path))
    with pytest.raises(ConfigError, match=r"differs in optim\.lr, steps;"):
        check_same_run(tiny_config({**RUN, "steps": 30, "optim.lr": 1e-3}), str(tmp_path))
    # A run saved before a field existed resumes with the field at its default, and only then.
    saved = json.loads(tiny_config(RUN).to_json())
    del saved["data"]["shift_windows"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    check_same_run(tiny_config(RUN), str(tmp_path))
    with pytest.raises(ConfigError, match=r"differs in data\.shift_windows;"):
        check_same_run(tiny_config({**RUN, "data.shift_windows": True}), str(tmp_path))
