"""Wall-clock per case of our evaluation against kvpress's `kv-press-text-generation` pipeline, on the
same CPU in one run: cold (compilation included) and warm, at batch 1 and 8, per context length and
press, printed as ratios ours / kvpress, with the compute floor of a case (its prefill FLOPs at the
GEMM rate measured in the same run).

A case is a NIAH case (RULER's magic number in Paul Graham's essays) of `length` context tokens,
its question, and greedy decoding of `max_new_tokens` tokens. kvpress's pipeline takes one case per
call; its time per case is the call's wall time. Ours runs `tc.evaluation.runner.run_batch` on
`batch` cases; its time per case is the batch's wall time over `batch`: cold is the first batch of
each (length, press, batch) in this process (it compiles), warm the mean of the next `repeats`
batches. The last table is the prefill's rate (tokens/s, batch 1, warm) at each length, with the
share of the prefill's FLOPs that attention makes, which is what should make the rate fall with
length. The `--config.sweep` part runs a 21-case sweep over three lengths twice in a fresh process
(`tokcomp-jax eval`'s runner, no persistent compilation cache): cold per case against warm.

  python experiments/bench_vs_kvpress.py --config=configs/bench_vs_kvpress.py
  python experiments/bench_vs_kvpress.py --config=configs/bench_vs_kvpress.py --config.lengths=256 \
      --config.batches=1,2 --config.kvpress_cases=1 --config.repeats=1 --config.sweep_lengths=128,256
"""
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app
from ml_collections import config_flags

import tokcomp_jax as tc
from kvpress_counterparts import kvpress_press, load_both
from rates import gemm_rate, prefill_flops
from tokcomp_jax.evaluation import runner

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)


def time_ours(model, tokenizer, cases, press, batch: int, repeats: int, max_new_tokens: int) -> tuple[float, float]:
    """(cold, warm) wall seconds per case of `run_batch` on batches of `batch` cases."""
    def one(first: int) -> float:
        chosen = [cases[(first + i) % len(cases)] for i in range(batch)]
        start = time.perf_counter()
        runner.run_batch(model, tokenizer, chosen, press, max_new_tokens=max_new_tokens)
        return (time.perf_counter() - start) / batch
    cold = one(0)
    warm = [one(batch * (r + 1)) for r in range(repeats)]
    return cold, float(np.mean(warm))


def time_prefill(model, ids: np.ndarray, repeats: int) -> float:
    """Warm wall seconds of `tc.prefill` on `ids` `[1, S]` (full cache, no logits but the last)."""
    tc.prefill(model, ids)[0].block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        tc.prefill(model, ids)[0].block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best


def run_sweep_twice(config) -> dict:
    """Wall seconds of a sweep run cold then warm in this process (see `--config.sweep`)."""
    model, tokenizer = tc.load(config.model, dtype=config.dtype)
    sweep = runner.Sweep(presses=("none",), lengths=tuple(config.sweep_lengths), num_cases=config.sweep_cases,
                         batch_size=config.sweep_batch, max_new_tokens=config.max_new_tokens)
    seconds = []
    with tempfile.TemporaryDirectory() as directory:
        for name in ("cold", "warm"):
            start = time.perf_counter()
            records = runner.run_sweep(model, tokenizer, sweep, os.path.join(directory, f"{name}.jsonl"),
                                       model_name=config.model)
            seconds.append(time.perf_counter() - start)
    cases = len(records)
    return {"cases": cases, "cold_seconds_per_case": seconds[0] / cases, "warm_seconds_per_case": seconds[1] / cases,
            "compile_seconds_recorded": sum(r["compile_seconds"] for r in records)}


def main(argv):
    del argv
    config = _CONFIG.value
    if config.sweep_only:
        print(json.dumps(run_sweep_twice(config)))
        return
    both = load_both(config.model, config.dtype, "sdpa")
    model, tokenizer, hf_model, kvpress = both.model, both.tokenizer, both.hf_model, both.kvpress
    pipe = both.transformers.pipeline("kv-press-text-generation", model=hf_model, tokenizer=both.hf_tokenizer)
    lengths, batches = [int(x) for x in config.lengths], [int(x) for x in config.batches]
    rate = gemm_rate(max(lengths), model.config)
    print(f"{both.machine}")
    print(f"{config.model} {config.dtype}; NIAH cases, {config.max_new_tokens} new tokens; "
          f"XLA float32 GEMM rate {rate / 1e9:.0f} GFLOP/s (MLP shapes, {max(lengths)} rows)", flush=True)
    print(f"{'length':>6} {'press':>12} {'batch':>5} {'ours cold s':>11} {'ours warm s':>11} {'kvpress s':>9} "
          f"{'warm ratio':>10} {'cold ratio':>10} {'floor s':>7} {'floor ratio':>11}", flush=True)
    rows = []
    for length in lengths:
        sweep = runner.Sweep(presses=("none",), lengths=(length,), num_cases=max(batches) * (config.repeats + 1),
                             max_new_tokens=config.max_new_tokens)
        cases = runner.make_cases(tokenizer, sweep, length)
        linear, attention = prefill_flops(model.config, length)
        floor = (linear + attention) / rate
        for name, ratio in config.presses:
            press = tc.presses.make_press(name, ratio, model)
            kv_seconds = []
            for case in cases[:config.kvpress_cases]:
                context, question, prefix = runner.prompt_parts(case)
                start = time.perf_counter()
                pipe(context, question=question, answer_prefix=prefix, max_new_tokens=config.max_new_tokens,
                     press=kvpress_press(kvpress, name, ratio))
                kv_seconds.append(time.perf_counter() - start)
            theirs = float(np.mean(kv_seconds))
            for batch in batches:
                cold, warm = time_ours(model, tokenizer, cases, press, batch, config.repeats, config.max_new_tokens)
                row = {"length": length, "press": name, "ratio": ratio, "batch": batch, "ours_cold": cold,
                       "ours_warm": warm, "kvpress": theirs, "floor": floor}
                rows.append(row)
                print(f"{length:>6} {name + (f' {ratio}' if ratio else ''):>12} {batch:>5} {cold:>11.2f} "
                      f"{warm:>11.2f} {theirs:>9.2f} {warm / theirs:>10.2f} {cold / theirs:>10.2f} {floor:>7.2f} "
                      f"{floor / theirs:>11.2f}", flush=True)
    print(f"\n{'length':>6} {'prefill tok/s':>13} {'attention FLOPs %':>17} {'GFLOP/s':>8} {'rate / 512 rate':>15} "
          f"{'explained by FLOPs':>18}")
    rng = np.random.default_rng(0)
    prefill_rows, base = [], None
    for length in lengths:
        seconds = time_prefill(model, rng.integers(0, model.config.vocab_size, (1, length)).astype(np.int32),
                               config.repeats + 1)
        linear, attention = prefill_flops(model.config, length)
        per_token_flops = (linear + attention) / length
        base = base or (length / seconds, per_token_flops)
        explained = base[1] / per_token_flops  # the rate's fall if FLOP/s stayed as at the first length
        prefill_rows.append({"length": length, "tokens_per_second": length / seconds,
                             "attention_share": attention / (linear + attention),
                             "flops_per_second": (linear + attention) / seconds, "explained_fall": explained})
        print(f"{length:>6} {length / seconds:>13.0f} {100 * attention / (linear + attention):>17.1f} "
              f"{(linear + attention) / seconds / 1e9:>8.0f} {length / seconds / base[0]:>15.2f} {explained:>18.2f}",
              flush=True)
    sweep = None
    if config.sweep:
        config_file = next(a for a in sys.argv if a.startswith("--config="))
        command = [sys.executable, __file__, config_file, "--config.sweep_only=True",
                   f"--config.sweep_lengths={','.join(map(str, config.sweep_lengths))}",
                   f"--config.sweep_cases={config.sweep_cases}", f"--config.sweep_batch={config.sweep_batch}",
                   f"--config.max_new_tokens={config.max_new_tokens}", f"--config.model={config.model}",
                   f"--config.dtype={config.dtype}"]
        environment = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
        output = subprocess.run(command, check=True, capture_output=True, text=True, env=environment).stdout
        sweep = json.loads(output.strip().splitlines()[-1])
        print(f"\nsweep of {sweep['cases']} cases over lengths {list(config.sweep_lengths)} in a fresh process: "
              f"cold {sweep['cold_seconds_per_case']:.2f} s/case, warm {sweep['warm_seconds_per_case']:.2f} s/case, "
              f"cold / warm {sweep['cold_seconds_per_case'] / sweep['warm_seconds_per_case']:.2f}")
    if config.output:
        os.makedirs(os.path.dirname(config.output) or ".", exist_ok=True)
        with open(config.output, "w", encoding="utf-8") as f:
            json.dump({"command": shlex.join(["python", *sys.argv]), "machine": both.machine,
                       "gemm_flops_per_second": rate, "rows": rows, "prefill": prefill_rows, "sweep": sweep}, f,
                      indent=1)
        print(f"numbers: {config.output}")


if __name__ == "__main__":
    app.run(main)
