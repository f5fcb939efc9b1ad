"""Prefill and decode speed of tokcomp_jax vs Hugging Face transformers, side by side.

Both run the same model file (GGUF, dequantized to the same weights) on the same token ids, greedy,
for a fixed number of new tokens (no early stop), after one warm-up run (which pays for XLA
compilation). Prints a table of times and the ratio transformers / ours. Absolute times depend on
the machine; the device is printed with them.

  python experiments/bench_generation.py --config=configs/bench_generation.py
  python experiments/bench_generation.py --config=configs/bench_generation.py --config.batch_size=4
"""
import os
import platform
import sys
import time

import jax
import numpy as np
from absl import app
from ml_collections import config_flags

import tokcomp_jax as tc

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)


def _best_time(fn, repeats: int) -> float:
    fn()  # warm-up: compilation, allocator, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _real_text_ids(tokenizer, length: int, batch: int) -> np.ndarray:
    source = os.path.join(os.path.dirname(os.__file__), "argparse.py")  # the standard library's own text
    with open(source, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read())
    if len(ids) < length + batch:
        raise ValueError(f"{source} has {len(ids)} tokens, fewer than prompt length {length}.")
    return np.stack([ids[row:row + length] for row in range(batch)]).astype(np.int32)


def main(argv):
    del argv
    config = _CONFIG.value
    try:
        import torch
        import transformers
    except ImportError as e:
        sys.exit(f"this benchmark compares with transformers: pip install -e '.[test]' ({e})")
    transformers.utils.logging.disable_progress_bar()
    model, tokenizer = tc.load(config.model, dtype=config.dtype)
    path = tc.checkpoints.resolve_model_path(config.model)
    directory, filename = os.path.split(path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=filename, dtype=getattr(torch, config.dtype)).eval()
    print(f"device: {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}), "
          f"torch threads {torch.get_num_threads()}, model {config.model} {config.dtype}, "
          f"batch {config.batch_size}, {config.max_new_tokens} new tokens")
    print(f"{'prompt':>7} {'ours prefill s':>15} {'hf prefill s':>13} {'hf/ours':>8} "
          f"{'ours decode tok/s':>18} {'hf decode tok/s':>16} {'ours/hf':>8}")
    for length in config.prompt_lengths:
        ids = _real_text_ids(tokenizer, length, config.batch_size)
        capacity = length + config.max_new_tokens

        def ours_prefill():
            jax.block_until_ready(tc.prefill(model, ids, capacity=capacity, chunk_size=config.chunk_size))

        def ours_generate():
            tc.generate_ids(model, ids, max_new_tokens=config.max_new_tokens, chunk_size=config.chunk_size)

        torch_ids = torch.tensor(ids)
        mask = torch.ones_like(torch_ids)

        def hf_prefill():
            with torch.no_grad():
                hf_model(torch_ids, attention_mask=mask)

        def hf_generate():
            with torch.no_grad():
                hf_model.generate(torch_ids, attention_mask=mask, max_new_tokens=config.max_new_tokens,
                                  min_new_tokens=config.max_new_tokens, do_sample=False)

        prefill = _best_time(ours_prefill, config.repeats), _best_time(hf_prefill, config.repeats)
        generate = _best_time(ours_generate, config.repeats), _best_time(hf_generate, config.repeats)
        new_tokens = config.max_new_tokens * config.batch_size
        decode = [new_tokens / max(g - p, 1e-9) for g, p in zip(generate, prefill)]
        print(f"{length:>7} {prefill[0]:>15.3f} {prefill[1]:>13.3f} {prefill[1] / prefill[0]:>8.2f} "
              f"{decode[0]:>18.1f} {decode[1]:>16.1f} {decode[0] / decode[1]:>8.2f}")


if __name__ == "__main__":
    app.run(main)
