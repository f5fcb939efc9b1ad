"""Config of experiments/train.py: gist tokens (Mu et al., 2023) with full fine-tuning of
Llama-3-8B on a TPU v5p-128 slice (64 chips, 16 hosts of 4 chips), FSDP over all 64 chips.

Rows are 1536-token windows of the corpus: 1024 context tokens, compressed into 32 gists, and the
512 tokens after them, predicted from the gists alone; each row runs 1568 tokens. One row per chip
fits without rematerialisation, which would cost a third more FLOPs; a 2048-token context needs it:
`--config.gist.context_tokens=2048 --config.data.window=2560 --config.remat=True`.
docs/training_at_scale.md has the per-device memory estimate, the step time and what the trainer
still lacks at this scale; the estimate is printed by

  python experiments/estimate_memory.py --config=configs/train_llama3_8b_gist_v5p.py --shape=llama3-8b

`config.model.name` is a local Hugging Face directory of Meta-Llama-3-8B (config.json, tokenizer.json,
*.safetensors) at the same path on every host, a copy on each host's disk or a shared mount:
`--config.model.name=/mnt/models/Meta-Llama-3-8B`. Each host reads the whole checkpoint.

Launch: one process per host, the same command on all of them at once. `experiments/train.py`
calls `jax.distributed.initialize()`, which finds the slice's other hosts itself; the mesh then
spans all 64 chips and each process feeds its 4 chips' rows:

  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="cd ~/tokcomp_jax && \\
      python experiments/train.py --config=configs/train_llama3_8b_gist_v5p.py \\
      --config.model.name=/mnt/models/Meta-Llama-3-8B --workdir=/mnt/shared/runs/gist_8b"

The workdir must be one POSIX directory that every host sees (Filestore, or a bucket mounted with
gcsfuse at the same path): all processes write the checkpoints (96 GB each: float32 parameters and
AdamW moments) together. Run the same command again to resume.

The built-in corpora are small (Shakespeare, the largest, is 1.2-1.4M tokens: an epoch is about 6
updates of 128 rows), so this run checks the pod set-up, memory and speed; a useful
compressor needs a larger corpus.
"""
import ml_collections

from tokcomp_jax.training import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.task = "gist"
    config.gist = ml_collections.ConfigDict({"num_tokens": 32, "context_tokens": 1024})
    config.model.name = "/path/to/Meta-Llama-3-8B"  # a local HF directory: set it with --config.model.name
    config.data.tokenizer = "model"
    config.data.corpus = "shakespeare"
    config.data.window = 1536             # 1024 context + 512 continuation tokens; rows run 1568 with the gists
    config.trainable = "full"
    config.compute_dtype = "bfloat16"
    config.batch_size = 128               # rows per update: 201k tokens run, 66k of them predicted
    config.grad_accum_steps = 2           # micro-batches of 64 rows: one row per chip
    config.remat = False                  # fits without: 41 GiB of the 95 per chip
    config.steps = 120
    config.optim.lr = 1e-5
    config.optim.warmup_steps = 10
    config.optim.weight_decay = 0.0
    config.optim.b2 = 0.95
    config.mesh.data = 1
    config.mesh.fsdp = 64
    config.mesh.tensor = 1
    config.log_every = 5
    config.checkpoint.every = 40
    config.checkpoint.max_to_keep = 2
    return config
