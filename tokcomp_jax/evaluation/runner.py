"""Sweeps of presses x compression ratios x context lengths on long-context tasks: batched, and
resumable (every finished batch of cases is appended to a JSON Lines file; a rerun skips the cases
that file holds).

Compression is question-agnostic by default, as in kvpress's benchmarks: the press compresses the
context (the task's instruction and haystack) before the question is seen, and the question is then
answered on the compressed cache. `query_aware=True` puts the question in the compressed context.
The perplexity task reads essay text with the cache compressed back to its budget after every
chunk (StreamingLLM's language-modelling setting).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import jax
import numpy as np

from tokcomp_jax.batching import CAPACITY_QUANTUM, quantized
from tokcomp_jax.data.corpora import CORPORA
from tokcomp_jax.evaluation.data import read_jsonl
from tokcomp_jax.evaluation.perplexity import perplexity
from tokcomp_jax.evaluation.scoring import score
from tokcomp_jax.evaluation.tasks import (Case, common_words, haystack, multi_key, multi_value, passkey, text_needle,
                                          variable_tracking)
from tokcomp_jax.generation import (DEFAULT_CHUNK_SIZE, context_length, generate_ids, prefill,
                                    split_context_and_questions)
from tokcomp_jax.presses.online import chunkwise
from tokcomp_jax.presses.qfilter import calibrate_qfilters
from tokcomp_jax.presses.registry import NO_PRESS, PRESS_NAMES, make_press

def text_to_read(tokenizer, context_tokens: int, seed: int = 0, corpus: str = "essays") -> Case:
    """Text to read (the perplexity task): no question, no answer."""
    return Case("perplexity", haystack(tokenizer, context_tokens, seed, corpus), "", (), context_tokens, None,
                {"metric": "perplexity"})


TASKS = {"niah": text_needle, "passkey": passkey, "multi_key": multi_key, "multi_value": multi_value,
         "variable_tracking": variable_tracking, "common_words": common_words, "perplexity": text_to_read}
# Tasks whose needle is placed at a chosen depth: a sweep's cases spread it evenly over the context.
DEPTH_TASKS = ("niah", "passkey", "multi_key")
# Tokens generated per answer (RULER's tokens_to_generate, shorter where the answer is short).
MAX_NEW_TOKENS = {"niah": 32, "passkey": 16, "multi_key": 32, "multi_value": 64, "variable_tracking": 32,
                  "common_words": 120, "user": 64, "perplexity": 0}


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What to run: every press in `presses` (names of `tc.presses.PRESS_NAMES`, "none" for the full
    cache) at every ratio in `ratios`, on `num_cases` cases of `task` at each context length in
    `lengths` (tokens of the compressed context: instruction, haystack and chat-template prefix), in
    batches of `batch_size` rows, the haystack taken from `corpus` (see `tokcomp_jax.data.CORPORA`). `data`, a
    JSONL file of user cases, replaces task, corpus and lengths.
    `max_new_tokens` defaults to the task's `MAX_NEW_TOKENS`."""

    presses: tuple[str, ...] = (NO_PRESS, "streaming_llm", "knorm", "snapkv")
    ratios: tuple[float, ...] = (0.5,)
    lengths: tuple[int, ...] = (1024,)
    task: str = "niah"
    num_cases: int = 4
    seed: int = 0
    batch_size: int = 4
    max_new_tokens: int | None = None
    query_aware: bool = False
    chunk_size: int = DEFAULT_CHUNK_SIZE
    data: str | None = None
    corpus: str = "essays"

    def __post_init__(self):
        for name in ("presses", "ratios", "lengths"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unknown = [p for p in self.presses if p not in PRESS_NAMES]
        if not self.presses or unknown:
            raise ValueError(f"presses must name presses of {', '.join(PRESS_NAMES)}; got {list(self.presses)}.")
        if not self.ratios or any(not isinstance(r, (int, float)) or not 0 <= r < 1 for r in self.ratios):
            raise ValueError(f"ratios must be fractions of entries removed, in [0, 1); got {list(self.ratios)}.")
        if self.data is None:
            if self.task not in TASKS:
                raise ValueError(f"task must be one of {', '.join(TASKS)} (or give data=a JSONL file); "
                                 f"got {self.task!r}.")
            if self.corpus not in CORPORA:
                raise ValueError(f"corpus must be one of {', '.join(CORPORA)}, got {self.corpus!r}.")
            if not self.lengths or any(not isinstance(n, int) or n < 128 for n in self.lengths):
                raise ValueError(f"lengths must be context lengths in tokens, each >= 128; got {list(self.lengths)}.")
        else:
            try:
                read_jsonl(self.data)  # every row checked now, before any model loads
            except ValueError as e:
                raise ValueError(f"data: {e}") from None
        for name in ("num_cases", "batch_size", "chunk_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}.")
        if self.task == "perplexity" and self.data is None:
            for press in self.presses:
                try:
                    if press != NO_PRESS:
                        chunkwise(make_press(press, tokens=8))
                except ValueError as e:
                    raise ValueError(f"task perplexity compresses the cache while it fills, which press {press!r} "
                                     f"cannot: {e}") from None
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be a positive int (or None: the task's default), "
                             f"got {self.max_new_tokens!r}.")

    @property
    def task_name(self) -> str:
        """The task as results name it: with its corpus unless essays; user data by its file's name."""
        if self.data is not None:
            return f"user:{os.path.basename(self.data)}"
        return self.task if self.corpus == "essays" else f"{self.task}@{self.corpus}"

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens or MAX_NEW_TOKENS[self.task if self.data is None else "user"]

    def check_context(self, context: int | None) -> None:
        """Raises unless the longest context length and the new tokens fit a model's `context`
        positions (None: unbounded); the question's tokens are checked when its batch runs."""
        if context is not None and self.data is None and max(self.lengths) + self.new_tokens > context:
            raise ValueError(f"lengths go up to {max(self.lengths)} tokens, which with {self.new_tokens} new tokens "
                             f"(max_new_tokens) run past the model's context of {context}; keep lengths below "
                             f"{context - self.new_tokens}, minus the question's tokens.")

    def settings(self) -> list[tuple[str, float]]:
        """(press, ratio) pairs to run; the full cache once, at ratio 0."""
        full = [(NO_PRESS, 0.0)] if NO_PRESS in self.presses else []
        return full + [(p, float(r)) for p in self.presses if p != NO_PRESS for r in self.ratios]


def prompt_parts(case: Case, query_aware: bool = False) -> tuple[str, str, str]:
    """(context, question, answer prefix) as compressed and asked: the instruction opens the context;
    the question follows it on a new line (inside the context when `query_aware`)."""
    context = "\n".join(p for p in (case.meta.get("instruction", ""), case.context) if p)
    question = "\n" + case.question
    if query_aware:
        context, question = context + question, ""
    return context, question, case.meta.get("answer_prefix", "")


def encode_case(tokenizer, case: Case, query_aware: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of a case's context (what a press compresses) and of its question turn."""
    context, question, prefix = prompt_parts(case, query_aware)
    context_ids, (question_ids,) = split_context_and_questions(tokenizer, context, [question], prefix)
    return context_ids, question_ids


def make_cases(tokenizer, sweep: Sweep, length: int) -> list[Case]:
    """The sweep's cases at one context length: seeds `seed .. seed + num_cases - 1`, needles at evenly
    spread depths ((i + 0.5) / num_cases), each context fitting `length` tokens once encoded."""
    generator = TASKS[sweep.task]
    if sweep.task == "perplexity":
        return [generator(tokenizer, length, seed=sweep.seed + i, corpus=sweep.corpus) for i in range(sweep.num_cases)]
    cases = []
    for i in range(sweep.num_cases):
        kwargs = {"seed": sweep.seed + i, "corpus": sweep.corpus}
        if sweep.task in DEPTH_TASKS:
            kwargs["depth"] = round((i + 0.5) / sweep.num_cases, 4)
        case = generator(tokenizer, length, **kwargs)
        overhead = len(encode_case(tokenizer, case, sweep.query_aware)[0]) - case.context_tokens
        if case.context_tokens + overhead > length:  # leave room for the instruction and the template
            case = generator(tokenizer, length - overhead, **kwargs)
        cases.append(case)
    return cases


class CompileClock:
    """Seconds JAX spent tracing and compiling within a time window, from JAX's monitoring events,
    so that measured times can leave compilation out."""

    _EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
               "/jax/core/compile/backend_compile_duration")
    _spans: list[tuple[float, float]] = []
    _registered = False

    def __init__(self):
        if not CompileClock._registered:
            jax.monitoring.register_event_time_span_listener(self._record)
            CompileClock._registered = True

    @classmethod
    def _record(cls, event: str, start: float, end: float, **_) -> None:
        if event in cls._EVENTS:
            cls._spans.append((start, end))

    def within(self, start: float, end: float) -> float:
        """Compilation seconds overlapping [start, end] (`time.time()` stamps); nested events (a
        function traced while tracing another) count once."""
        total, reached = 0.0, start
        for a, b in sorted(self._spans):
            a, b = max(a, reached), min(b, end)
            if b > a:
                total += b - a
                reached = b
        return total


def run_batch(model, tokenizer, cases: Sequence[Case], press, *, max_new_tokens: int, query_aware: bool = False,
              chunk_size: int = DEFAULT_CHUNK_SIZE, clock: CompileClock | None = None) -> list[dict]:
    """Answers a batch of cases greedily, the context compressed by `press` (None: the full cache),
    and measures each: prediction, score, cache bytes held after compression and those of the full
    cache, context and question tokens, and per-case seconds (the batch's divided by its rows):
    prefill and decode with compilation left out, compilation, and the wall time of all of it. A case
    whose cache holds a NaN or inf at the end scores 0, with the first such layer in its "error"."""
    clock = clock or CompileClock()
    encoded = [encode_case(tokenizer, case, query_aware) for case in cases]
    contexts, questions = [c for c, _ in encoded], [q for _, q in encoded]
    # Rounded up, so that the sweep's batches of one length run the same compiled programs.
    capacity = quantized(max(map(len, contexts)) + max(map(len, questions)) + max_new_tokens)
    start = time.time()
    _, cache = prefill(model, contexts, press=press, capacity=capacity, chunk_size=chunk_size,
                       slot_quantum=CAPACITY_QUANTUM)
    jax.block_until_ready(cache)
    compressed = time.time()
    held = cache.entry_nbytes()
    result = generate_ids(model, questions, max_new_tokens=max_new_tokens, stop_ids=tokenizer.eos_ids,
                          chunk_size=chunk_size, pad_id=tokenizer.pad_id, cache=cache)
    answered = time.time()
    nonfinite = result.cache.nonfinite()  # [L, B], the numerics guard of `generate_ids(check_finite=True)` per row
    asked = compressed + result.prefill_seconds
    prefill_seconds = compressed - start - clock.within(start, compressed) + result.prefill_seconds - clock.within(
        compressed, asked)
    decode_seconds = answered - asked - clock.within(asked, answered)
    per_token = cache_bytes_per_token(model)
    rows = len(cases)
    records = []
    for row, (case, context, question, tokens, nbytes) in enumerate(zip(cases, contexts, questions, result.tokens,
                                                                       held)):
        prediction = tokenizer.decode(tokens)
        records.append({
            "prediction": prediction, "score": score(case, prediction), "answers": list(case.answers),
            "depth": case.depth, "context_tokens": len(context), "question_tokens": len(question),
            "cache_bytes": int(nbytes), "full_cache_bytes": len(context) * per_token,
            "new_tokens": len(tokens), "prefill_seconds": prefill_seconds / rows,
            "decode_seconds": decode_seconds / rows, "compile_seconds": clock.within(start, answered) / rows,
            "wall_seconds": (answered - start) / rows, "batch_size": rows,
        })
        if nonfinite[:, row].any():  # a failed case, not a score of whatever NaN logits decoded to
            layer = int(np.argmax(nonfinite[:, row]))
            records[-1].update(score=0.0, error=f"NaN or inf in the cache from layer {layer} on")
    return records


def run_perplexity_batch(model, tokenizer, cases: Sequence[Case], press, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                         clock: CompileClock | None = None) -> list[dict]:
    """Reads a batch of texts with the cache compressed while it fills (see `perplexity`) and
    measures each: mean negative log-likelihood per token, tokens scored, cache bytes held at the end
    and those of the full cache, and per-case seconds: reading (compilation left out), compilation,
    and the wall time of both."""
    clock = clock or CompileClock()
    ids = [tokenizer.encode(case.context) for case in cases]
    start = time.time()
    result = perplexity(model, ids, press=press, chunk_size=chunk_size)
    end = time.time()
    per_token = cache_bytes_per_token(model)
    seconds = (end - start - clock.within(start, end)) / len(cases)
    return [{"nll": float(nll.mean()), "scored_tokens": int(nll.size), "context_tokens": len(row),
             "question_tokens": 0, "new_tokens": 0, "cache_bytes": int(nbytes),
             "full_cache_bytes": len(row) * per_token, "prefill_seconds": seconds, "decode_seconds": 0.0,
             "compile_seconds": clock.within(start, end) / len(cases), "wall_seconds": (end - start) / len(cases),
             "batch_size": len(cases)}
            for row, nll, nbytes in zip(ids, result.token_nll, result.cache_bytes)]


def cache_bytes_per_token(model) -> int:
    """Bytes one token adds to the full KV cache: its keys, values and position, in every layer."""
    c = model.config
    return c.num_layers * c.num_kv_heads * (2 * c.head_dim * model.dtype.itemsize + 4)


def record_key(record: dict) -> str:
    """What identifies a case's result: everything that changes its outcome."""
    fields = ("model", "dtype", "task", "length", "seed", "case", "press", "ratio", "query_aware", "max_new_tokens")
    return json.dumps([record[f] for f in fields])


def read_results(path: str | os.PathLike) -> dict[str, dict]:
    """The results a sweep's JSONL file holds, by `record_key`. A last line cut short by a killed run is
    dropped from the file (its batch runs again); a malformed line elsewhere raises, naming it."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    results = {}
    for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
                results[record_key(record)] = record
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{os.fspath(path)}, line {number}: not a sweep result ({e}); move the file "
                                 f"away or pass another results path.") from None
    return results


def _append(path: str | os.PathLike, records: Sequence[dict]) -> None:
    """Appends whole lines in one write, flushed to disk, so that a kill leaves at most one cut line."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


class Batch(NamedTuple):
    """Cases (indices into a length's cases) to run together at one press, ratio and length."""
    press: str
    ratio: float
    length: int
    cases: tuple[int, ...]


def calibration_text(tokenizer) -> str:
    """Essay text that Q-Filters are estimated on (1,024 tokens, no needle)."""
    return haystack(tokenizer, 1024, seed=-1)


def run_sweep(model, tokenizer, sweep: Sweep, results_path: str | os.PathLike, *, model_name: str,
              progress: Callable[[list[Batch]], Iterable[Batch]] | None = None) -> list[dict]:
    """Runs what `results_path` does not hold yet of `sweep`, appending each batch's records as it
    finishes, and returns all of the sweep's records (earlier ones included) in sweep order.
    `progress` wraps the list of batches to run (e.g. with a progress bar) and yields them."""
    sweep.check_context(context_length(model))
    done = read_results(results_path)
    if sweep.data is not None:
        by_length = {0: read_jsonl(sweep.data, tokenizer)}
    else:
        by_length = {length: make_cases(tokenizer, sweep, length) for length in sweep.lengths}
    identities = {(press, ratio, length): [
        {"model": model_name, "dtype": model.dtype.name, "task": sweep.task_name, "length": length,
         "seed": sweep.seed, "case": i, "press": press, "ratio": ratio, "query_aware": sweep.query_aware,
         "max_new_tokens": sweep.new_tokens} for i in range(len(cases))]
        for press, ratio in sweep.settings() for length, cases in by_length.items()}
    plan = []
    for (press, ratio, length), ids in identities.items():
        todo = [i for i, identity in enumerate(ids) if record_key(identity) not in done]
        plan += [Batch(press, ratio, length, tuple(todo[i:i + sweep.batch_size]))
                 for i in range(0, len(todo), sweep.batch_size)]
    qfilters = None  # estimated once per sweep, for every ratio
    clock = CompileClock()
    for batch in (progress or iter)(plan):
        if batch.press == "qfilter" and qfilters is None:
            qfilters = calibrate_qfilters(model, [tokenizer.encode(calibration_text(tokenizer))])
        cases = [by_length[batch.length][i] for i in batch.cases]
        if sweep.task == "perplexity" and sweep.data is None:  # a budget in tokens, kept while the cache fills
            tokens = max(1, int(batch.length * (1 - batch.ratio)))
            press = make_press(batch.press, model=model, tokens=tokens)
            records = run_perplexity_batch(model, tokenizer, cases, press, chunk_size=sweep.chunk_size, clock=clock)
        else:
            press = make_press(batch.press, batch.ratio, model, qfilters=qfilters)
            records = run_batch(model, tokenizer, cases, press, max_new_tokens=sweep.new_tokens,
                                query_aware=sweep.query_aware, chunk_size=sweep.chunk_size, clock=clock)
        ids = identities[batch.press, batch.ratio, batch.length]
        records = [{**ids[i], **r} for i, r in zip(batch.cases, records)]
        _append(results_path, records)
        done.update((record_key(r), r) for r in records)
    return [done[record_key(identity)] for ids in identities.values() for identity in ids]
