"""A 2-process `jax.distributed` run on localhost (2 fake CPU devices each, subprocesses:
tests/distributed_worker.py) trains like one process: the same losses, each process reads only its
own rows of each batch, and the checkpoint the processes write together restores."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from tokcomp_jax.training import ByteTokenizer, Checkpoints, Trainer, lm_windows, read_metrics, train
from tokcomp_jax.training.optim import learning_rate_schedule
from tolerances import network, training_losses
from training_worker import logits_magnitude, model_config, tiny_config
from conftest import ROOT, TESTS

WORKER = str(TESTS / "distributed_worker.py")
PROCESSES, DEVICES_PER_PROCESS = 2, 2
RUN = {"steps": 20, "checkpoint.every": 100}  # one save, at the end
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def worker_env() -> dict[str, str]:
    # Without LLVM's optimisations, which only slow the compilation down here; cross-process
    # collectives of CPU devices go over Gloo (TCP), JAX's default.
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "KUBERNETES_"))}
    env.update(XLA_FLAGS=flags, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(DEVICES_PER_PROCESS),
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    return env


def wait_for(workers: list[subprocess.Popen], logs: list[Path], deadline: float) -> None:
    """Waits until every worker has exited 0; fails as soon as one fails or the deadline passes (the
    caller kills those left: one process waits for the others in each collective)."""
    def tails() -> str:
        return "\n".join(f"--- worker {i} (exit {w.poll()}):\n{log.read_text()[-2000:]}"
                         for i, (w, log) in enumerate(zip(workers, logs)))

    while any(w.poll() is None for w in workers):
        assert all(w.poll() in (None, 0) for w in workers), f"a worker failed:\n{tails()}"
        assert time.monotonic() < deadline, f"the workers ran past {TIMEOUT_S} s:\n{tails()}"
        time.sleep(0.1)
    assert all(w.returncode == 0 for w in workers), f"a worker failed:\n{tails()}"


def test_two_processes_train_like_one_device_and_write_one_checkpoint(tmp_path):
    workdir, port = tmp_path / "run", free_port()
    logs = [tmp_path / f"worker{i}.log" for i in range(PROCESSES)]
    results = [tmp_path / f"worker{i}.json" for i in range(PROCESSES)]
    workers = []
    try:
        for i in range(PROCESSES):
            with open(logs[i], "w") as log:
                workers.append(subprocess.Popen(
                    [sys.executable, WORKER, f"localhost:{port}", str(PROCESSES), str(i), str(workdir),
                     json.dumps(RUN), str(results[i])],
                    cwd=ROOT, env=worker_env(), stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + TIMEOUT_S
        # Meanwhile, the same run on this process's device (one in a plain pytest run).
        config = tiny_config(RUN)
        initial = Trainer(config).init_state()["trained"]
        state = train(config, str(tmp_path / "one"))
        wait_for(workers, logs, deadline)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
            worker.wait()
    reports = [json.loads(path.read_text()) for path in results]

    rows = config.batch_size // PROCESSES
    for i, report in enumerate(reports):
        assert (report["process_index"], report["process_count"]) == (i, PROCESSES)
        assert (report["local_device_count"], report["device_count"]) == (DEVICES_PER_PROCESS,
                                                                           PROCESSES * DEVICES_PER_PROCESS)
        # Each process read only its own rows of every batch, and its devices hold exactly those rows.
        assert {(read["process_index"], read["process_count"], read["rows"]) for read in report["reads"]} == {
            (i, PROCESSES, rows)}
        assert {read["step"] for read in report["reads"]} == set(range(config.steps))
        assert report["global_rows_held"] == list(range(i * rows, (i + 1) * rows))
        assert report["held_rows_are_local_rows"]
        # The checkpoint at the last step restores, on the same processes, to the trained state.
        assert report["latest_checkpoint"] == config.steps and report["restored_difference"] == 0
    first_batch = lm_windows(config, ByteTokenizer(), "train").batch(0)["ids"]
    np.testing.assert_array_equal(np.concatenate([report["first_rows"] for report in reports]), first_batch)

    # Process 0 alone wrote the metrics (each step once) and the config.
    records = read_metrics(str(workdir / "metrics.jsonl"))
    assert [record["step"] for record in records] == list(range(1, config.steps + 1))
    expected = [record["loss"] for record in read_metrics(str(tmp_path / "one" / "metrics.jsonl"))]
    # 4 devices sum the gradients in another order: `training_losses`, with the logits' magnitude at
    # the first and the last update.
    train_windows = lm_windows(config, ByteTokenizer(), "train")
    magnitude = logits_magnitude(config, [initial, state["trained"]],
                                 [train_windows.batch(0)["ids"], train_windows.batch(config.steps - 1)["ids"]])
    window, tokens = config.data.window, config.batch_size * (config.data.window - 1)
    tolerance = training_losses(model_config(config), window - 1, tokens, expected, magnitude)
    np.testing.assert_array_less(np.abs(np.subtract([record["loss"] for record in records], expected)), tolerance)
    assert json.loads((workdir / "config.json").read_text())["steps"] == config.steps
    # One checkpoint, written by both processes, that restores here too, onto this process's mesh.
    assert os.listdir(workdir / "checkpoints") == [str(config.steps)]
    checkpoints = Checkpoints(str(workdir / "checkpoints"), max_to_keep=1)
    restored = checkpoints.restore(config.steps, Trainer(config).abstract_state())
    checkpoints.close()
    # Each update's gradients carry a relative error (sums over the batch's tokens through the
    # network): Adam's step lr * m / sqrt(v) is at most lr * max(1, (1 - b1) / sqrt(1 - b2)) (Kingma
    # and Ba, 2015, section 2.1) and carries it too, the steps add up, and each rounds the parameter
    # to its float32 spacing (this holds where no gradient cancels down to its rounding: that would
    # flip sign(g) in the first steps). The moments average the gradients (v their squares: twice
    # the error), relative to their largest entry, over the steps.
    relative = network(max(model_config(config).intermediate_size, tokens), model_config(config).num_layers, 1.0)
    optim, schedule = config.optim, learning_rate_schedule(config.optim, config.steps)
    step_bound = max(1.0, (1 - optim.b1) / np.sqrt(1 - optim.b2))
    moved = relative * step_bound * sum(float(schedule(step)) for step in range(config.steps))

    def check(path, a, b):
        a, b = np.asarray(a), np.asarray(b)
        if path[0].key == "trained":
            bound = moved + config.steps * np.spacing(np.abs(b).astype(b.dtype))
        else:
            bound = 2 * config.steps * relative * np.abs(b).max(initial=0)
        assert np.all(np.abs(a - b) <= bound), (jax.tree_util.keystr(path), np.max(np.abs(a - b) - bound))
    jax.tree_util.tree_map_with_path(check, jax.device_get(restored), jax.device_get(state))
