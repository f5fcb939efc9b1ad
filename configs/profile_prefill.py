"""Config of experiments/profile_prefill.py: where a prefill's time goes (docs/performance.md).

Smoke run: --config.lengths=1024 --config.chunk=256 --config.repeats=1 --config.compile_layers=1,2
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = "smollm2-135m-instruct"
    config.dtype = "float32"
    config.lengths = (512, 2048, 4096)  # context tokens; the last chunk of each is profiled
    config.chunk = 512                  # tokens per prefill chunk (the default chunk size)
    config.repeats = 3                  # timed calls, the fastest kept
    config.compile_layers = (1, 2, 4, 8)  # layers of the models whose compilation is timed
    config.compile_length = 1024
    config.output = ""                  # a JSON file for the numbers, if set
    return config
