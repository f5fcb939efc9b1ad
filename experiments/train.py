"""Trains a learned compressor (or a plain LM) from a config; a killed run resumes where it stopped.

  python experiments/train.py --config=configs/train_tiny.py --workdir=/tmp/tiny
  python experiments/train.py --config=configs/train_smollm2_lm.py --workdir=runs/smollm2_lora \
      --config.steps=50 --config.mesh.fsdp=4

The workdir gets config.json, checkpoints/ and metrics.jsonl (see `tokcomp_jax.training.train`).
Running the same command again resumes from the newest checkpoint. On a TPU pod slice or a GPU
cluster, run the same command on every host (see `tokcomp_jax.sharding.initialize_distributed`).
"""
from absl import app, flags, logging
from ml_collections import config_flags

from tokcomp_jax import training
from tokcomp_jax.sharding import initialize_distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/train_*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run's checkpoints and metrics.", required=True)


def main(argv):
    del argv
    initialize_distributed()  # before any other JAX call
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs each save at INFO
    try:
        training.train(_CONFIG.value, _WORKDIR.value)
    except training.ConfigError as e:
        raise SystemExit(f"train.py: {e}") from e


if __name__ == "__main__":
    app.run(main)
