"""Trains a learned compressor (or a plain LM) from a config; a killed run resumes where it stopped.

  python experiments/train.py --config=configs/train_tiny.py --workdir=/tmp/tiny
  python experiments/train.py --config=configs/train_smollm2_lm.py --workdir=runs/smollm2_lora \
      --config.steps=50 --config.mesh.fsdp=4

The workdir gets config.json, checkpoints/ and metrics.jsonl (see `tokcomp_jax.training.train`).
Running the same command again resumes from the newest checkpoint. On a TPU pod slice or a GPU
cluster under SLURM or Open MPI, run the same command on every host: the processes find each other
(see `tokcomp_jax.sharding.initialize_distributed`). Elsewhere, start one process per host with the
address of process 0, the number of processes and each one's id, and the same shared workdir; e.g.
two processes of two CPU devices each on one machine:

  for i in 0 1; do JAX_NUM_CPU_DEVICES=2 python experiments/train.py --config=configs/train_tiny.py \
      --workdir=/tmp/tiny2 --coordinator_address=localhost:12345 --num_processes=2 --process_id=$i & done

Process 0 writes config.json and metrics.jsonl; all of them write the checkpoints together.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from tokcomp_jax import training
from tokcomp_jax.sharding import initialize_distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/train_*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run's checkpoints and metrics.", required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 in a multi-process run (default: found on TPU pods, "
                                   "SLURM, Open MPI; else a single process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.",
                                      lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id, 0 to num_processes - 1.", lower_bound=0)


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs each save at INFO
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)  # before any other JAX call
    try:
        training.train(_CONFIG.value, _WORKDIR.value)
    except (training.ConfigError, training.CheckpointError) as e:
        raise SystemExit(f"train.py: {e}") from e


if __name__ == "__main__":
    app.run(main)
