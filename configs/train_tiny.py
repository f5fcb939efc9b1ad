"""Config of experiments/train.py: a tiny random Llama learning UTF-8 bytes of essays (seconds on CPU).

  python experiments/train.py --config=configs/train_tiny.py --workdir=/tmp/tiny
"""
import ml_collections

from tokcomp_jax.training import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model.name = "tiny"
    config.model.overrides = ml_collections.ConfigDict({"vocab_size": 264})  # 257 byte tokens, padded
    config.data.tokenizer = "bytes"
    config.data.window = 64
    config.batch_size = 8
    config.steps = 30
    config.optim.lr = 3e-3
    config.optim.warmup_steps = 3
    config.checkpoint.every = 10
    config.checkpoint.max_to_keep = 2
    return config
