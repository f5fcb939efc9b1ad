"""Config of experiments/bench_vs_kvpress.py: wall-clock per case, ours against kvpress's pipeline.

Smoke run (a few minutes): --config.lengths=256 --config.batches=1,2 --config.kvpress_cases=1
--config.repeats=1 --config.sweep_lengths=128,256 --config.sweep_cases=2
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = "smollm2-135m-instruct"
    config.dtype = "float32"
    config.lengths = (512, 2048, 4096)   # context tokens of a case
    config.presses = (("none", 0.0), ("snapkv", 0.5))
    config.batches = (1, 8)              # our batch sizes; kvpress's pipeline takes one case per call
    config.max_new_tokens = 24
    config.kvpress_cases = 2             # kvpress calls timed per (length, press)
    config.repeats = 1                   # warm batches timed after the cold one
    config.sweep = True                  # also time a sweep cold and warm in a fresh process
    config.sweep_only = False            # (set by the script for that process)
    config.sweep_lengths = (512, 2048, 4096)
    config.sweep_cases = 7               # cases per length of the sweep
    config.sweep_batch = 8
    config.output = ""                   # a JSON file for the numbers, if set
    return config
