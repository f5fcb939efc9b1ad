"""Config of experiments/bench_kernels.py: the Pallas kernels against their XLA references.

Shapes are Llama-3-8B's attention (32 query heads, 8 KV heads, head dim 128, bfloat16).
Smoke run on CPU (interpret mode, seconds):
  --config.lengths=256, --config.batch_sizes=1, --config.ratios=0.5, --config.prefill_lengths=128,
  --config.window_prefill_length=256 --config.num_heads=4 --config.num_kv_heads=2 --config.head_dim=64
  --config.dtype=float32 --config.repeats=1 --config.copy_mib=8
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.num_heads = 32
    config.num_kv_heads = 8
    config.head_dim = 128
    config.dtype = "bfloat16"
    config.batch_sizes = (1, 8)
    config.lengths = (4096, 32768, 131072)  # tokens in the cache before compression (decode)
    config.ratios = (0.0, 0.5, 0.75, 0.9)    # fraction of each KV head's entries removed (0: the full cache)
    config.prefill_lengths = (1024, 4096, 16384)  # prefill attention, kernel vs XLA reference
    config.window_size = 64                  # SnapKV's window of queries
    config.window_prefill_length = 32768     # window scoring is compared with a prefill of this length
    config.reference_max_bytes = 16 << 30    # skip an XLA reference whose score matrix would exceed this
    config.repeats = 10                      # timed calls after a warm-up call; the median is kept
    config.copy_mib = 2048                   # the array copied to measure the device's bandwidth
    config.seed = 0
    return config
