"""String-match scoring of predictions, as in RULER (Hsieh et al., 2024, arXiv:2404.06654).

RULER's metrics: `string_match_all` (the fraction of the answers found in the prediction, case-insensitive)
for the needle, variable-tracking and common-words tasks, and `string_match_part` (1 if any answer is
found) for QA. Two changes make numbers robust: digit groups are joined ("71,432" and "71 432" read as
"71432"), and a numeric answer must stand alone ("714320" does not contain the answer "71432").
"""
from __future__ import annotations

import re

from tokcomp_jax.evaluation.tasks import Case

# A number written in groups of three digits: "71,432", "1 234 567", "71'432", "71_432".
_GROUPED = re.compile(r"(?<![\d.,])\d{1,3}(?:[,'’_\u00a0\u202f ]\d{3})+(?![\d]|[,.]\d)")


def normalize(text: str) -> str:
    """Lowercase, with separators removed from digit groups.

    >>> normalize("The pass key is 71,432.")
    'the pass key is 71432.'
    """
    return _GROUPED.sub(lambda m: re.sub(r"\D", "", m.group()), text).lower()


def _found(answer: str, text: str) -> bool:
    answer = normalize(answer.strip())
    if answer.isdigit():
        return re.search(rf"(?<!\d){answer}(?!\d)", text) is not None
    return answer in text


def score(case: Case, prediction: str, metric: str | None = None) -> float:
    """The prediction's score in [0, 1]: `metric` "all" (the fraction of `case.answers` found) or "part" (1 if
    any is found); default `case.meta["metric"]`, else "all".

    >>> from tokcomp_jax.evaluation.tasks import Case
    >>> case = Case("passkey", "...", "What is the pass key?", ("71432",), 3)
    >>> score(case, "The pass key is 71,432."), score(case, "It is 71433.")
    (1.0, 0.0)
    """
    metric = metric or case.meta.get("metric", "all")
    if metric not in ("all", "part"):
        raise ValueError(f"metric must be 'all' or 'part', got {metric!r}.")
    if not isinstance(prediction, str):
        raise ValueError(f"prediction must be a str, got {type(prediction).__name__}.")
    if not case.answers:
        raise ValueError("case.answers is empty: nothing to score against.")
    text = normalize(prediction)
    hits = [_found(a, text) for a in case.answers]
    return float(any(hits)) if metric == "part" else sum(hits) / len(hits)
