"""Config of experiments/eval_vs_kvpress.py: our evaluation against kvpress's pipeline on the same cases.

Smoke run (about a minute): --config.num_cases=2 --config.presses=none,knorm --config.length=256
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = "smollm2-135m-instruct"
    config.dtype = "float32"
    config.task = "niah"                 # RULER's single magic-number needle in Paul Graham's essays
    config.length = 512                  # context tokens (instruction, haystack, chat-template prefix)
    config.num_cases = 40                # needles at 40 evenly spread depths, one seed each
    config.seed = 0
    config.ratio = 0.5                   # fraction of the context's KV cache removed
    config.presses = ("none", "streaming_llm", "knorm", "snapkv", "observed_attention", "tova", "keydiff",
                      "expected_attention", "adakv_snapkv")
    config.max_new_tokens = 16
    config.batch_size = 8                # ours; kvpress's pipeline takes one context per call
    config.output = ""                   # a JSON file for the numbers and every answer, if set
    return config
