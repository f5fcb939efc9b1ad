"""Config of experiments/train.py: gist tokens (Mu et al., 2023) for SmolLM2-135M-Instruct that
compress 128 tokens of an essay into `gist.num_tokens` (16: 8x, 8: 16x), trained with LoRA adapters
on the attention projections, so that the next 64 tokens are predicted from the gists alone.
Held-out essays (every 10th) are never trained on.

  python experiments/train.py --config=configs/train_smollm2_gist.py --workdir=runs/gist_k16
  python experiments/train.py --config=configs/train_smollm2_gist.py --config.gist.num_tokens=8 \
      --workdir=runs/gist_k8
"""
import ml_collections

from tokcomp_jax.training import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.task = "gist"
    config.gist = ml_collections.ConfigDict({"num_tokens": 16, "context_tokens": 128, "distill_weight": 0.0})
    config.model.name = "smollm2-135m-instruct"
    config.data.tokenizer = "model"
    config.data.corpus = "essays"
    config.data.window = 192              # 128 context + 64 continuation tokens
    config.batch_size = 8
    config.steps = 100
    config.trainable = "lora"
    config.lora.rank = 8
    config.lora.alpha = 16.0
    config.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 10
    config.optim.weight_decay = 0.0
    config.log_every = 10
    config.checkpoint.every = 25
    config.checkpoint.max_to_keep = 2
    return config
