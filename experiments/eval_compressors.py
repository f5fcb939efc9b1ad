"""Continuation perplexity on held-out text with the context compressed by trained compressors,
against no context, the full context, and training-free presses keeping as many entries per layer
and KV head as the compressor has tokens.

Windows of the compressor's training length are cut from the essays its run held out (every
`held_out_every`-th one); each is [context (the run's context_tokens), continuation]. Every method
turns the context into a cache, and continuation tokens 2..m are scored given that cache and the
continuation tokens before them (the first continuation token is the input that starts reading).
Presses run on the base model, each compressor on its own trained model; "no context, trained
model" is that model without the context, so what the compressed tokens add shows apart from what
training on the corpus adds.

Each file's column reports the trained compressor's perplexity ratio to the best press and to no
context with a 95% paired-bootstrap interval over the windows. Results of other files already in
--output are kept, and their base-model scores reused for a file of the same windows and budget.

  python experiments/eval_compressors.py \
      --compressors=compressors/gist_smollm2_k16.safetensors,compressors/gist_smollm2_k8.safetensors
"""
import collections
import json
import os
import time

import numpy as np
from absl import app, flags

from tokcomp_jax.evaluation import continuation_nll, paired_interval
from tokcomp_jax.generation import prefill
from tokcomp_jax.learned.artifacts import load_trained
from tokcomp_jax.learned.data import corpus_windows
from tokcomp_jax.learned.gist import compress_to_gists
from tokcomp_jax.learned.icae import compress_to_memory, lora_encoder
from tokcomp_jax.presses import make_press
from tokcomp_jax.training import load_model

_COMPRESSORS = flags.DEFINE_list("compressors", None, "safetensors files written by "
                                 "tokcomp_jax.learned.artifacts.export_trained.", required=True)
_PRESSES = flags.DEFINE_list("presses", ["streaming_llm", "snapkv", "tova", "observed_attention", "a2sf", "knorm",
                                         "keydiff", "expected_attention"],
                             "Training-free presses to compare, at the compressor's budget.")
_MAX_WINDOWS = flags.DEFINE_integer("max_windows", None, "Score at most this many held-out windows (default: all).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.")
_REUSE = flags.DEFINE_bool("reuse", True, "Take the base model's scores (no context, full context, presses) from "
                           "--output's results.json where it holds them for the same model, windows and budget.")
_OUTPUT = flags.DEFINE_string("output", "experiments/results/compressors", "Directory of results.md and "
                              "results.json; results there of files not evaluated now are kept.")

# How each task's trained parameters compress a context into a cache with `room` free slots.
COMPRESS = {
    "gist": lambda trained, context, room: compress_to_gists(trained.model, trained.task_params, context, room=room),
    "icae": lambda trained, context, room: compress_to_memory(
        lora_encoder(trained.model, trained.task_params.adapters, trained.config.lora.alpha / trained.config.lora.rank),
        trained.model, trained.task_params.icae, context, room=room),
}
BUDGET_FIELD = {"gist": "num_tokens", "icae": "num_slots"}
BASELINES = ("no context", "full context", "no context, trained model")
WINDOW_FIELDS = ("corpus", "tokenizer", "window", "held_out_every")  # the config.data fields held_out_windows reads


def window_fields(config) -> dict:
    """The run's config.data fields that decide its held-out windows."""
    return {key: config.data[key] for key in WINDOW_FIELDS}


def held_out_windows(tokenizer, config) -> np.ndarray:
    """`[N, window]` consecutive windows of the run's held-out documents (cut by WINDOW_FIELDS)."""
    data = window_fields(config)
    windows = corpus_windows(tokenizer, data["corpus"], "held_out", data["window"], 1,
                             held_out_every=data["held_out_every"])
    count = windows.num_windows if _MAX_WINDOWS.value is None else min(_MAX_WINDOWS.value, windows.num_windows)
    return windows.tokens[:count * windows.window].reshape(count, windows.window)


def window_nll(make_cache, model, windows: np.ndarray, n: int) -> np.ndarray:
    """Each window's mean NLL of continuation tokens 2..m, with `make_cache(context, room)` the
    context's cache (None: no context)."""
    nll = []
    for start in range(0, len(windows), _BATCH.value):
        rows = windows[start:start + _BATCH.value]
        context, continuation = rows[:, :n], rows[:, n:]
        nll.append(continuation_nll(model, continuation, make_cache(context, continuation.shape[1])).mean(axis=1))
    return np.concatenate(nll)


def evaluate(path: str, previous: list[dict]) -> dict:
    """Scores every method on the held-out windows of the run that made `path`; with --reuse, the base
    model's methods come from a result in `previous` of the same model, windows and budget."""
    trained = load_trained(path)
    config = trained.config
    fields = config[config.task]
    if config.task not in COMPRESS:
        raise SystemExit(f"eval_compressors.py: {path} is a {config.task!r} run; it evaluates {', '.join(COMPRESS)}.")
    n, budget = fields.context_tokens, fields[BUDGET_FIELD[config.task]]
    base, tokenizer = load_model(config)
    windows = held_out_windows(tokenizer, config)
    setup = {"model": config.model.to_dict(), "data": window_fields(config),
             "context_tokens": n, "budget": budget, "windows": len(windows)}
    reused = next((r["window_nll"] for r in previous if _REUSE.value and r.get("setup") == setup), {})

    def pressed(name):
        press = make_press(name, tokens=budget)
        return lambda context, room: prefill(base, context, press=press, capacity=context.shape[1] + room)[1]

    methods = {"no context": (base, lambda context, room: None),
               "full context": (base, lambda context, room: prefill(base, context,
                                                                    capacity=context.shape[1] + room)[1]),
               **{name: (base, pressed(name)) for name in _PRESSES.value},
               "no context, trained model": (trained.model, lambda context, room: None),
               f"{config.task} (trained)": (trained.model, lambda context, room: COMPRESS[config.task](
                   trained, context, room))}
    nll, per_window = {}, {}
    for name, (model, make_cache) in methods.items():
        start = time.perf_counter()
        if model is base and name in reused:
            per_window[name], source = np.asarray(reused[name]), " (reused)"
        else:
            per_window[name], source = window_nll(make_cache, model, windows, n), ""
        nll[name] = float(per_window[name].mean())
        seconds = time.perf_counter() - start
        print(f"{os.path.basename(path)} {name:>26}: ppl {np.exp(nll[name]):8.3f}  ({seconds:.0f} s){source}",
              flush=True)
    return {"file": path, "task": config.task, "context_tokens": n, "budget": budget, "ratio": n / budget,
            "continuation_tokens": config.data.window - n, "windows": len(windows), "setup": setup, "nll": nll,
            "window_nll": {name: [round(float(v), 6) for v in values] for name, values in per_window.items()}}


def best_press(result: dict) -> str | None:
    """The press of lowest perplexity in `result` (None if it scored none)."""
    presses = {name: v for name, v in result["nll"].items() if name not in BASELINES and not name.endswith("(trained)")}
    return min(presses, key=presses.get) if presses else None


def comparisons(result: dict) -> list[str]:
    """The trained compressor's perplexity over the best press's and over no context's, with 95%
    intervals from a paired bootstrap over the windows."""
    trained = result["window_nll"][f"{result['task']} (trained)"]
    lines = []
    for name in (best_press(result), "no context"):
        if name is not None:
            ratio, low, high = paired_interval(trained, result["window_nll"][name])
            lines.append(f"{result['task']} {result['ratio']:g}x ({os.path.basename(result['file'])}) / {name}: "
                         f"perplexity ratio {ratio:.3f} [{low:.3f}, {high:.3f}]")
    return lines


def markdown(results: list[dict]) -> str:
    columns = [f"{r['task']} {r['ratio']:g}x ({r['context_tokens']} → {r['budget']}): {os.path.basename(r['file'])}"
               for r in results]
    rows = collections.OrderedDict()
    for column, result in zip(columns, results):
        best = best_press(result)
        for name, value in result["nll"].items():
            mark = " (best press)" if name == best else ""
            rows.setdefault(name, {})[column] = f"{np.exp(value):.2f}{mark}"
    lines = ["| context as | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cells.get(c, "") for c in columns) + " |" for name, cells in rows.items()]
    lines += ["", "Trained over baseline, perplexity ratio with its 95% interval (paired bootstrap over windows; "
              "below 1: the trained compressor is better):", ""]
    lines += [f"- {line}" for result in results for line in comparisons(result)]
    return "\n".join(lines)


def previous_results() -> list[dict]:
    """The results already in --output's results.json that hold per-window scores."""
    path = os.path.join(_OUTPUT.value, "results.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [result for result in json.load(f) if "window_nll" in result]


def merged(results: list[dict], previous: list[dict]) -> list[dict]:
    """`results` and those of other files in `previous`, by task and ratio."""
    evaluated = {result["file"] for result in results}
    return sorted([r for r in previous if r["file"] not in evaluated] + results, key=lambda r: (r["task"], r["ratio"]))


def main(argv):
    del argv
    previous = previous_results()
    results = merged([evaluate(path, previous) for path in _COMPRESSORS.value], previous)
    table = markdown(results)
    print(table)
    os.makedirs(_OUTPUT.value, exist_ok=True)
    with open(os.path.join(_OUTPUT.value, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(_OUTPUT.value, "results.md"), "w") as f:
        f.write("Continuation perplexity (tokens 2..m) on held-out essays, SmolLM2-135M-Instruct.\n\n" + table + "\n")


if __name__ == "__main__":
    app.run(main)
