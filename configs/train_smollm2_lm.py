"""Config of experiments/train.py: LoRA adapters on SmolLM2-135M-Instruct, language modelling of
Paul Graham's essays (about 142k training tokens: 17 updates per epoch), in bfloat16.

  python experiments/train.py --config=configs/train_smollm2_lm.py --workdir=runs/smollm2_lora
Smoke run (a minute on CPU): --config.steps=2 --config.optim.warmup_steps=0 --config.batch_size=2 \
    --config.grad_accum_steps=1 --config.data.window=64 --config.compute_dtype=float32
"""
import ml_collections

from tokcomp_jax.training import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model.name = "smollm2-135m-instruct"
    config.data.tokenizer = "model"
    config.data.corpus = "essays"
    config.data.window = 512
    config.batch_size = 16
    config.grad_accum_steps = 2           # micro-batches of 8 rows
    config.steps = 150                    # about 9 epochs
    config.compute_dtype = "bfloat16"
    config.trainable = "lora"
    config.lora.rank = 16
    config.lora.alpha = 32.0
    config.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    config.optim.lr = 2e-4
    config.optim.warmup_steps = 15
    config.optim.weight_decay = 0.0
    config.log_every = 5
    config.checkpoint.every = 50
    config.checkpoint.max_to_keep = 3
    return config
