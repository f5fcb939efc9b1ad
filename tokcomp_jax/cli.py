"""The `tokcomp-jax` command.

  tokcomp-jax generate --prompt "What is the capital of France?"   answer a prompt
  tokcomp-jax eval --presses none,knorm,snapkv --ratios 0.5          sweep presses on long-context tasks
  tokcomp-jax info                                                  describe a model and its cache
"""
from __future__ import annotations

import logging
import math
import os
import shlex
import sys
import time

import jax
from absl import app, flags
from flax import nnx

from tokcomp_jax.checkpoints import DEFAULT_MODEL, load, read_context_length
from tokcomp_jax.checkpoints.weights import resolve_dtype
from tokcomp_jax.data.corpora import CORPORA
from tokcomp_jax.evaluation import reports, runner
from tokcomp_jax.files import check_writable_directory
from tokcomp_jax.generation import encode_prompts, generate_ids, stop_token_ids, text_streamer
from tokcomp_jax.presses import PRESS_NAMES, Budget, make_press
from tokcomp_jax.sampling import SamplingConfig

COMMANDS = ("generate", "eval", "info")

_MODEL = flags.DEFINE_string("model", DEFAULT_MODEL, "Known model name, .gguf file or Hugging Face directory.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Parameter and cache dtype: float32 or bfloat16.")
_ATTN = flags.DEFINE_enum("attn_impl", "xla", ["xla", "pallas"],
                          "Attention implementation: the XLA reference or the Pallas kernels (interpreted on CPU).")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt to answer; repeat the flag for a batch.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Most tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample within the smallest set of this probability mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed for sampling.")
_CHAT = flags.DEFINE_bool("chat", True, "Wrap prompts in the model's chat template.")
_CHUNK = flags.DEFINE_integer("chunk_size", 512, "Prefill chunk size in tokens.")
_PRESS = flags.DEFINE_string("press", None,
                             "KV-cache press applied to the prompt, e.g. snapkv (see tc.presses.PRESS_NAMES).")
_RATIO = flags.DEFINE_float("ratio", 0.5, "Fraction of the prompt's KV-cache entries the press removes.")
# eval: the default sweep is the README's main job (minutes on 2 CPU cores).
_PRESSES = flags.DEFINE_list("presses", ["none", "streaming_llm", "knorm", "snapkv"],
                             f"eval: presses to sweep, comma-separated, of {', '.join(PRESS_NAMES)}.")
_RATIOS = flags.DEFINE_list("ratios", ["0.5", "0.75"], "eval: compression ratios to sweep.")
_LENGTHS = flags.DEFINE_list("lengths", ["512", "1024"], "eval: context lengths in tokens to sweep.")
_TASK = flags.DEFINE_enum("task", "niah", list(runner.TASKS), "eval: the long-context task.")
_CORPUS = flags.DEFINE_enum("corpus", "essays", list(CORPORA), "eval: the text needles are hidden in.")
_DATA = flags.DEFINE_string("data", None, "eval: a JSONL file of {context, question, answers} rows (replaces --task).")
_CASES = flags.DEFINE_integer("num_cases", 4, "eval: cases per context length (needles at evenly spread depths).")
_BATCH = flags.DEFINE_integer("batch_size", 4, "eval: cases run together in one batch.")
_QUERY_AWARE = flags.DEFINE_bool("query_aware", False, "eval: compress the context with the question in it.")
_XLA_CACHE = flags.DEFINE_string(
    "compilation_cache", None, "Directory of the persistent XLA compilation cache, so that a second run starts "
    "without compiling (default: $XDG_CACHE_HOME/tokcomp_jax/xla, ~/.cache when unset); an empty "
    "value (--compilation_cache=) turns it off.")
_OUTPUT = flags.DEFINE_string("output_dir", "eval_results", "eval: where results.jsonl, report.md and report.png go; "
                              "a rerun resumes from results.jsonl.")
_TRUNCATE = flags.DEFINE_bool("truncate_left", False, "generate: a prompt that with --max_new_tokens runs past the "
                              "model's context keeps its last tokens (with a warning) instead of failing.")

# The flags each command reads, besides --model, --dtype, --attn_impl and --compilation_cache; giving
# one that a command does not read is an error, not a silently ignored flag.
COMMAND_FLAGS = {
    "generate": (_PROMPT, _MAX_NEW, _TEMPERATURE, _TOP_K, _TOP_P, _SEED, _CHAT, _CHUNK, _PRESS, _RATIO, _TRUNCATE),
    "eval": (_PRESSES, _RATIOS, _LENGTHS, _TASK, _CORPUS, _DATA, _CASES, _BATCH, _QUERY_AWARE, _OUTPUT, _MAX_NEW,
             _CHUNK, _SEED),
    "info": (),
}
COMMON_FLAGS = (_MODEL, _DTYPE, _ATTN, _XLA_CACHE)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compilation_cache_dir() -> str | None:
    """The persistent compilation cache's directory that `--compilation_cache` asks for (None: off)."""
    if _XLA_CACHE.present:
        return _XLA_CACHE.value or None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tokcomp_jax", "xla")


def _use_compilation_cache() -> None:
    directory = compilation_cache_dir()
    if directory is None:
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)  # programs worth a file
    jax.config.update("jax_compilation_cache_max_size", 4 << 30)  # also turns on the cache's file lock


def _load():
    start = time.perf_counter()
    _log(f"Loading {_MODEL.value} ({_DTYPE.value}, attention {_ATTN.value})...")
    model, tokenizer = load(_MODEL.value, dtype=_DTYPE.value, attn_impl=_ATTN.value)
    _log(f"Loaded in {time.perf_counter() - start:.1f} s.")
    return model, tokenizer


def check_flags(command: str) -> None:
    """Raises `ValueError` for a flag `command` does not read and for values of the flags it reads
    that cannot run, before anything loads."""
    reads = {name: {flag.name for flag in flags_of} for name, flags_of in COMMAND_FLAGS.items()}
    allowed = reads[command] | {flag.name for flag in COMMON_FLAGS}
    ignored = sorted(name for name in set().union(*reads.values()) - allowed if flags.FLAGS[name].present)
    if ignored:
        owners = {name: " and ".join(c for c in COMMAND_FLAGS if name in reads[c]) for name in ignored}
        raise ValueError(f"{command} does not read " + ", ".join(f"--{name} (a flag of {owners[name]})"
                                                              for name in ignored) + "; leave it out.")
    resolve_dtype(_DTYPE.value)
    for flag in (_MAX_NEW, _CHUNK):
        if flag.name in reads[command] and flag.value < 1:
            raise ValueError(f"--{flag.name} must be a positive number of tokens, got {flag.value}.")
    if command == "generate" and _PRESS.value is None and _RATIO.present:
        raise ValueError("--ratio is the fraction of entries a press removes, and no --press is given; add "
                         f"--press (one of {', '.join(PRESS_NAMES)}) or leave --ratio out.")
    if command == "eval" and _DATA.value is not None:
        replaced = [f"--{flag.name}" for flag in (_TASK, _CORPUS, _LENGTHS, _CASES) if flag.present]
        if replaced:
            raise ValueError(f"--data replaces {', '.join(replaced)}: its rows are the cases; leave them out.")


def generate_command() -> None:
    if not _PROMPT.value:
        raise app.UsageError("generate needs --prompt \"...\" (repeat it for a batch).")
    sampling = SamplingConfig(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    press = None
    if _PRESS.value is not None:
        if _PRESS.value not in PRESS_NAMES:
            raise ValueError(f"--press {_PRESS.value!r} is not a press; choose one of {', '.join(PRESS_NAMES)}.")
        Budget(ratio=_RATIO.value)  # checks --ratio before the model loads
    model, tokenizer = _load()
    if _PRESS.value is not None:
        calibration = tokenizer.encode(runner.calibration_text(tokenizer)) if _PRESS.value == "qfilter" else None
        press = make_press(_PRESS.value, _RATIO.value, model, calibration)
    prompts = _PROMPT.value
    ids = encode_prompts(tokenizer, prompts, _CHAT.value and tokenizer.chat_template is not None)
    show = text_streamer(tokenizer, 1, lambda _, text: print(text, end="", flush=True))
    clock, start = runner.CompileClock(), time.time()
    result = generate_ids(model, ids, max_new_tokens=_MAX_NEW.value, sampling=sampling,
                          stop_ids=stop_token_ids(tokenizer, ()), seed=_SEED.value,
                          chunk_size=_CHUNK.value, pad_id=tokenizer.pad_id,
                          on_tokens=show if len(prompts) == 1 else None, press=press,
                          truncate_left=_TRUNCATE.value)
    compiled = clock.within(start, time.time())
    if len(prompts) == 1:
        print()
    else:
        for prompt, tokens in zip(prompts, result.tokens):
            print(f"> {prompt}\n{tokenizer.decode(tokens)}\n")
    prompt_tokens = sum(result.prompt_lengths)
    _log(f"prefill: {prompt_tokens} tokens in {result.prefill_seconds:.2f} s; "
         f"decode: {sum(map(len, result.tokens))} tokens in {result.decode_seconds:.2f} s; "
         f"of these, compilation {compiled:.2f} s; cache: {result.cache.nbytes / 2**20:.2f} MiB")


def _numbers(flag, kind):
    try:
        return tuple(kind(v) for v in flag.value)
    except ValueError:
        raise ValueError(f"--{flag.name} takes comma-separated {kind.__name__}s, "
                         f"got {','.join(flag.value)!r}.") from None


def eval_command() -> None:
    from tqdm import tqdm

    sweep = runner.Sweep(presses=tuple(_PRESSES.value), ratios=_numbers(_RATIOS, float),
                         lengths=_numbers(_LENGTHS, int), task=_TASK.value, num_cases=_CASES.value, seed=_SEED.value,
                         batch_size=_BATCH.value, max_new_tokens=_MAX_NEW.value if _MAX_NEW.present else None,
                         query_aware=_QUERY_AWARE.value, chunk_size=_CHUNK.value, data=_DATA.value,
                         corpus=_CORPUS.value)
    check_writable_directory(_OUTPUT.value, "--output_dir")
    context = read_context_length(_MODEL.value)
    try:
        sweep.check_context(context)
    except ValueError as e:
        raise ValueError(f"--lengths: {e}") from None
    os.makedirs(_OUTPUT.value, exist_ok=True)
    results = os.path.join(_OUTPUT.value, "results.jsonl")
    model, tokenizer = _load()

    def progress(batches):
        bar = tqdm(batches, unit="batch", dynamic_ncols=True, desc="eval")
        for batch in bar:
            bar.set_postfix_str(f"{batch.press} {batch.ratio:.2f} @{batch.length}")
            yield batch

    records = runner.run_sweep(model, tokenizer, sweep, results, model_name=_MODEL.value, progress=progress)
    title = (f"{_MODEL.value} ({model.dtype.name}), task {sweep.task_name}, "
             f"{'query-aware' if sweep.query_aware else 'question-agnostic'}")
    table = reports.markdown_table(records)
    command = shlex.join(["tokcomp-jax", *sys.argv[1:]])
    with open(os.path.join(_OUTPUT.value, "report.md"), "w", encoding="utf-8") as f:
        f.write(f"# {title}\n\nCommand: `{command}`\n\n{table}\n")
    path = reports.plot(records, os.path.join(_OUTPUT.value, "report.png"), title)
    print(f"\n{title}\n\n{table}\n\nPlot: {path}\nResults: {results} ({len(records)} cases)")


def info_command() -> None:
    model, tokenizer = _load()
    c = model.config
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    rows = [
        ("model", _MODEL.value),
        ("architecture", c.architecture),
        ("parameters", f"{params:,} ({params * model.dtype.itemsize / 2**20:.1f} MiB in {model.dtype.name})"),
        ("layers", c.num_layers),
        ("hidden size", c.hidden_size),
        ("heads (query / KV)", f"{c.num_heads} / {c.num_kv_heads}, head_dim {c.head_dim}"),
        ("vocabulary", c.vocab_size),
        ("context length", c.max_position_embeddings),
        ("cache bytes per token", f"{runner.cache_bytes_per_token(model):,}"),
        ("cache bytes at context length",
         f"{runner.cache_bytes_per_token(model) * c.max_position_embeddings / 2**20:.1f} MiB"),
        ("chat template", "yes" if tokenizer.chat_template else "no"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: tokcomp-jax {{{'|'.join(COMMANDS)}}} [--flags]; got {argv[1:]}.")
    _use_compilation_cache()
    try:
        check_flags(argv[1])
        {"generate": generate_command, "eval": eval_command, "info": info_command}[argv[1]]()
    except ValueError as e:  # bad input (CheckpointError included): a message, not a traceback
        _log(f"tokcomp-jax: error: {e}")
        sys.exit(1)


def run() -> None:
    """Entry point of the `tokcomp-jax` console script."""
    flags.FLAGS.set_gnu_getopt(True)
    flags.FLAGS.set_default("verbosity", -1)  # warnings and errors only, unless --verbosity says more
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU found" on CPU/GPU
    app.run(main)


if __name__ == "__main__":
    run()
