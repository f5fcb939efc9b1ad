"""XLA's temporary bytes per device of the trainer's compiled train step, for tests/test_training_memory.py.

  python tests/memory_worker.py OVERRIDES
      compiles configs/train_tiny.py's step with OVERRIDES (JSON, {"mesh.fsdp": 8, ...}) three ways:
      as the trainer builds it ("constrained"), with config.remat ("remat"), and without the
      activation sharding constraint ("unconstrained"); prints {"devices": ..., name: bytes, ...}
      (run it with several devices).
"""
import json
import sys

import jax

from tokcomp_jax.testing import KEEP_REMAT_ON_CPU
from tokcomp_jax.training import Trainer, loop
from training_worker import tiny_config


def temp_bytes(config) -> int:
    return Trainer(config).lower_step().compile(KEEP_REMAT_ON_CPU).memory_analysis().temp_size_in_bytes


def main(overrides: str):
    config = tiny_config(json.loads(overrides))
    result = {"devices": jax.device_count(), "constrained": temp_bytes(config)}
    config.remat = True
    result["remat"] = temp_bytes(config)
    config.remat = False
    loop.activation_sharding = lambda mesh: None
    result["unconstrained"] = temp_bytes(config)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main(*sys.argv[1:])
