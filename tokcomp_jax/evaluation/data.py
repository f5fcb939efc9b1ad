"""User evaluation data: JSON Lines of {"context", "question", "answers"} rows, read into `Case`s.

Answers are scored with RULER's string match (Hsieh et al., 2024, arXiv:2404.06654); by default a row's
answers are alternatives (metric "part", as RULER's QA tasks); a row may set "metric": "all".
"""
from __future__ import annotations

import json
import os

from tokcomp_jax.evaluation.tasks import Case, Tokenizer


def read_jsonl(path: str | os.PathLike, tokenizer: Tokenizer | None = None) -> list[Case]:
    """One `Case` per non-blank line of `path`: {"context": str, "question": str, "answers": str | [str, ...]},
    with optional "task" (default "user"), "metric" ("part" or "all") and other keys kept in `meta`.
    `context_tokens` is measured with `tokenizer` when given, else 0 (not measured).

    Raises ValueError naming the file (and the 1-based line of a malformed row) for a file that is
    missing, not UTF-8 text, holds no rows, or a malformed row.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{os.fspath(path)} is not a file; give a JSON Lines file of context/question/answers rows.")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{os.fspath(path)} is not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); "
                         f"save it as UTF-8 JSON Lines.") from None
    if not any(line.strip() for line in lines):
        raise ValueError(f"{os.fspath(path)} holds no rows; write one JSON object per line with context, question "
                         f"and answers.")
    cases = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{os.fspath(path)}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg}).") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object with context, question and answers, "
                             f"got {type(row).__name__}.")
        for key in ("context", "question", "answers"):
            if key not in row:
                raise ValueError(f"{where}: missing key {key!r} (a row needs context, question and answers).")
        for key in ("context", "question"):
            if not isinstance(row[key], str):
                raise ValueError(f"{where}: {key!r} must be a string, got {type(row[key]).__name__}.")
        answers = [row["answers"]] if isinstance(row["answers"], str) else row["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a for a in answers):
            raise ValueError(f"{where}: 'answers' must be a non-empty string or a non-empty list of "
                             f"non-empty strings, got {row['answers']!r}.")
        meta = {k: v for k, v in row.items() if k not in ("context", "question", "answers", "task")}
        meta.setdefault("metric", "part")
        if meta["metric"] not in ("all", "part"):
            raise ValueError(f"{where}: 'metric' must be 'all' or 'part', got {meta['metric']!r}.")
        task = row.get("task", "user")
        if not isinstance(task, str):
            raise ValueError(f"{where}: 'task' must be a string, got {type(task).__name__}.")
        tokens = len(tokenizer.encode(row["context"])) if tokenizer is not None else 0
        cases.append(Case(task, row["context"], row["question"], tuple(answers), tokens, None, meta))
    return cases
