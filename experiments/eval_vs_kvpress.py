"""Accuracy and time per case of our evaluation against kvpress's `kv-press-text-generation` pipeline,
side by side on the same cases, prompts and presses.

Both run SmolLM2 (float32, from the same GGUF) greedily. For each case, the pipeline gets the same
context (the task's instruction and haystack), question and answer prefix as our runner, so the
chat-templated token ids are the same; compression is question-agnostic in both. Ours answers the
cases in batches (compilation timed apart and left out of the time per case, and printed); kvpress
answers one case per call, as its pipeline takes one context. transformers uses SDPA attention,
except for ObservedAttentionPress, which reads eager attention's weights. Per press: both accuracies
(RULER string match), the share of cases where both give the very same answer, and the time per case
of each with their ratio. Absolute times hold for the machine printed first.

  python experiments/eval_vs_kvpress.py --config=configs/eval_vs_kvpress.py
  python experiments/eval_vs_kvpress.py --config=configs/eval_vs_kvpress.py --config.num_cases=4 \
      --config.presses=none,knorm
"""
import contextlib
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import time

from absl import app
from ml_collections import config_flags

import tokcomp_jax as tc
from kvpress_counterparts import KVPRESS, kvpress_press, load_both
from tokcomp_jax.evaluation import runner

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)


def press_names(presses) -> list[str]:
    """`config.presses` checked: each must have a kvpress counterpart whose pipeline can decode."""
    names = [n.strip() for item in presses for n in str(item).split(",") if n.strip()]
    known = ["none", "adakv_snapkv", *(n for n in KVPRESS if n != "pyramidkv")]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"config.presses has names {unknown or list(presses)} without a kvpress pipeline run; "
                         f"choose among {', '.join(known)} (kvpress's pipeline cannot decode PyramidKV's caches).")
    return names


def main(argv):
    del argv
    config = _CONFIG.value
    names = press_names(config.presses)
    both = load_both(config.model, config.dtype, "sdpa")
    model, tokenizer, hf_model, kvpress = both.model, both.tokenizer, both.hf_model, both.kvpress
    pipe = both.transformers.pipeline("kv-press-text-generation", model=hf_model, tokenizer=both.hf_tokenizer)

    sweep = runner.Sweep(presses=tuple(names), ratios=(config.ratio,), lengths=(config.length,), task=config.task,
                         num_cases=config.num_cases, seed=config.seed, batch_size=config.batch_size,
                         max_new_tokens=config.max_new_tokens)
    cases = runner.make_cases(tokenizer, sweep, config.length)
    print(f"{both.machine}; kvpress {importlib.metadata.version('kvpress')}")
    print(f"{config.model} {config.dtype}; task {config.task}, {len(cases)} cases of <= {config.length} tokens; "
          f"ratio {config.ratio}; {sweep.new_tokens} new tokens at most; our batch {config.batch_size}")
    header = (f"{'press':>18} {'ours acc %':>10} {'kvpress acc %':>13} {'same answer %':>13} {'ours s/case':>11} "
              f"{'kvpress s/case':>14} {'kvpress/ours':>12} {'our compile s':>13}")
    print(header, flush=True)
    clock = runner.CompileClock()
    rows = []
    for name in names:
        ratio = 0.0 if name == "none" else config.ratio
        press = tc.presses.make_press(name, ratio, model)
        ours = []
        for first in range(0, len(cases), config.batch_size):
            ours += runner.run_batch(model, tokenizer, cases[first:first + config.batch_size], press,
                                     max_new_tokens=sweep.new_tokens, clock=clock)
        theirs, seconds = [], 0.0
        eager = name == "observed_attention"
        with contextlib.ExitStack() as stack:
            if eager:
                hf_model.set_attn_implementation("eager")
                stack.callback(hf_model.set_attn_implementation, "sdpa")
            for case in cases:
                context, question, prefix = runner.prompt_parts(case)
                start = time.perf_counter()
                answer = pipe(context, question=question, answer_prefix=prefix, max_new_tokens=sweep.new_tokens,
                              press=kvpress_press(kvpress, name, ratio))["answer"]
                seconds += time.perf_counter() - start
                theirs.append(answer)
        ours_time = sum(r["prefill_seconds"] + r["decode_seconds"] for r in ours) / len(cases)
        row = {"press": name, "ratio": ratio, "cases": len(cases),
               "ours_accuracy": 100 * sum(r["score"] for r in ours) / len(cases),
               "kvpress_accuracy": 100 * sum(tc.evaluation.score(c, a) for c, a in zip(cases, theirs)) / len(cases),
               "same_answer": 100 * sum(r["prediction"] == a for r, a in zip(ours, theirs)) / len(cases),
               "ours_seconds_per_case": ours_time, "kvpress_seconds_per_case": seconds / len(cases),
               "ours_compile_seconds": sum(r["compile_seconds"] for r in ours),
               "answers": [{"ours": r["prediction"], "kvpress": a, "expected": r["answers"]}
                           for r, a in zip(ours, theirs)]}
        rows.append(row)
        print(f"{name:>18} {row['ours_accuracy']:>10.1f} {row['kvpress_accuracy']:>13.1f} {row['same_answer']:>13.1f} "
              f"{row['ours_seconds_per_case']:>11.3f} {row['kvpress_seconds_per_case']:>14.3f} "
              f"{row['kvpress_seconds_per_case'] / row['ours_seconds_per_case']:>12.2f} "
              f"{row['ours_compile_seconds']:>13.1f}", flush=True)
    if config.output:
        os.makedirs(os.path.dirname(config.output) or ".", exist_ok=True)
        with open(config.output, "w", encoding="utf-8") as f:
            json.dump({"command": shlex.join(["python", *sys.argv]), "machine": platform.platform(),
                       "config": config.to_dict(), "rows": rows}, f, indent=1)
        print(f"answers and numbers: {config.output}")


if __name__ == "__main__":
    app.run(main)
