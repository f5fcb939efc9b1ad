"""Config of experiments/train.py: ICAE (Ge et al., 2024) for SmolLM2-135M-Instruct: a LoRA-adapted
encoder compresses 128 tokens of an essay into `icae.num_slots` memory slots (16: 8x, 8: 16x), from
which the frozen model reconstructs them and predicts the next 64 tokens (autoencoding and language
modelling, equally weighted). Held-out essays (every 10th) are never trained on.
`--config.icae.memory=kv` hands the decoder the encoder's KV entries at the memory tokens instead of
the slots as input embeddings (500xCompressor, arXiv:2408.03094).

  python experiments/train.py --config=configs/train_smollm2_icae.py --workdir=runs/icae_m16
  python experiments/train.py --config=configs/train_smollm2_icae.py --config.icae.num_slots=8 \
      --workdir=runs/icae_m8
"""
import ml_collections

from tokcomp_jax.training import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.task = "icae"
    config.icae = ml_collections.ConfigDict({"num_slots": 16, "context_tokens": 128, "ae_weight": 0.5,
                                            "distill_weight": 0.0, "memory": "embeddings"})
    config.model.name = "smollm2-135m-instruct"
    config.data.tokenizer = "model"
    config.data.corpus = "essays"
    config.data.window = 192              # 128 context + 64 continuation tokens
    config.batch_size = 8
    config.steps = 100
    config.trainable = "none"             # the decoder is frozen; the encoder's adapters are the task's
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
