"""Training of learned compressors: tasks, LoRA, the optimizer, sharded train steps, checkpoints.

`train(config, workdir)` runs (and resumes) a config made from `base_config()`; the command line is
`experiments/train.py --config=configs/train_tiny.py --workdir=DIR`. New methods plug in as tasks
(`register_task`, see `tokcomp_jax.training.tasks`); the language-modelling task "lm" is built in, and
the learned compressors' "gist" and "icae" register when `tokcomp_jax.learned.tasks` is imported
(`import tokcomp_jax` does it); training does not import them.
"""
from tokcomp_jax.training.checkpoint import CheckpointError, Checkpoints
from tokcomp_jax.training.config import base_config, check_config
from tokcomp_jax.training.data import ByteTokenizer, DataSource, TokenWindows
from tokcomp_jax.training.errors import ConfigError
from tokcomp_jax.training.loop import Trainer, load_model, train
from tokcomp_jax.training.lora import init_lora, merge_lora
from tokcomp_jax.training.metrics import read_metrics
from tokcomp_jax.training.optim import decay_mask, learning_rate_schedule, make_optimizer
from tokcomp_jax.training.tasks import Task, lm_windows, make_task, register_task, task_names

__all__ = ["train", "Trainer", "base_config", "check_config", "ConfigError", "Task", "register_task", "make_task",
           "task_names", "DataSource", "TokenWindows", "lm_windows", "ByteTokenizer", "load_model", "init_lora",
           "merge_lora", "make_optimizer", "learning_rate_schedule", "decay_mask", "Checkpoints", "CheckpointError",
           "read_metrics"]
