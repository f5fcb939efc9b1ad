"""Config of experiments/bench_generation.py: ours vs transformers on the same prompts."""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = "smollm2-135m-instruct"
    config.dtype = "float32"
    config.prompt_lengths = (128, 512)   # tokens of real text per prompt
    config.batch_size = 1
    config.max_new_tokens = 32
    config.repeats = 2                   # timed runs after one warm-up run; the best is kept
    config.chunk_size = 512
    return config
