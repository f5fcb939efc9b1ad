"""Synthetic long-context tasks: passkey, needles in a haystack, variable tracking, common words.

Formats follow RULER (Hsieh et al., 2024, arXiv:2404.06654: `niah`, `variable_tracking`,
`common_words_extraction`), Needle In A Haystack (Kamradt, 2023: Paul Graham essays as haystack, needle
depth as a fraction of the haystack, the San Francisco needle) and the passkey test of Landmark Attention
(Mohtashami & Jaggi, 2023, arXiv:2305.16300). Every generator is deterministic given `seed`, and takes
its haystack from a `corpus` of `tokcomp_jax.data.CORPORA`: Paul Graham's essays (default), Shakespeare, or
Python source.

A `tokenizer` is anything with `.encode(str) -> list[int]`; lengths are measured with it, on the whole
context. `Case.context` is the haystack with its needles; `Case.prompt()` adds the task's instruction
before it and the question after it.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import random
import re
import string
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from tokcomp_jax.data.corpora import corpus_units


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class Case:
    """One evaluation example. `depth` is the needle's position as a fraction of the haystack (None if
    several needles or none); `meta` holds the task's `instruction`, `answer_prefix`, `metric` ("all":
    every answer must appear, "part": any one), the needles and their depths."""
    task: str
    context: str
    question: str
    answers: tuple[str, ...]
    context_tokens: int
    depth: float | None = None
    meta: dict = dataclasses.field(default_factory=dict, compare=False)

    def prompt(self) -> str:
        """Instruction, context and question, one per paragraph (RULER's template order)."""
        return "\n".join(p for p in (self.meta.get("instruction", ""), self.context, self.question) if p)


# The needle of Kamradt's NIAH: (needle sentence, question, answers that must all appear).
SAN_FRANCISCO = ("The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
                 "What is the best thing to do in San Francisco?", ("sandwich", "Dolores Park"))

CITIES = ("Chicago", "Yangon", "Antananarivo", "Colombo", "Almaty", "Sydney", "Mexico City", "Seattle", "Lagos",
          "Amsterdam", "Belgrade", "Cairo", "Baghdad", "Damascus", "Kigali", "Dakar", "Sofia", "Victoria", "Tashkent",
          "Mumbai", "Barcelona", "Bangkok", "Lima", "Hanoi", "Oslo", "Nairobi", "Havana", "Kyoto", "Tbilisi", "Quito")

# RULER's needle depths: 40 evenly spaced percents, rounded.
DEPTHS = tuple(round(i * 100 / 39) / 100 for i in range(40))

_NIAH_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                     "I will quiz you about the numbers afterwards.")
_NIAH_QUESTION = "What are all the special magic numbers for {key} mentioned in the provided text?"
_NIAH_PREFIX = "The special magic numbers for {key} mentioned in the provided text are"
_NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."


def _count(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode(text))


def _largest(fits: Callable[[int], bool], lo: int = 0) -> int:
    """The largest n >= lo with fits(n), for a monotone `fits` with fits(lo) true (galloping, then bisection)."""
    hi = max(1, 2 * lo)
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _sentences(rng: random.Random, tokenizer: Tokenizer, budget: int, corpus: str = "essays") -> list[str]:
    """Whole sentences of `corpus`, from a seeded start (wrapping around), with at most `budget` tokens."""
    corpus = corpus_units(corpus)
    start = rng.randrange(len(corpus))
    take = lambda n: [corpus[(start + i) % len(corpus)] for i in range(n)]
    return take(_largest(lambda n: _count(tokenizer, "".join(take(n))) <= budget))


def haystack(tokenizer: Tokenizer, context_tokens: int, seed: int = 0, corpus: str = "essays") -> str:
    """Text of `corpus` (default Paul Graham's essays, as Kamradt, 2023) cut at a whole sentence to at
    most `context_tokens` tokens.

    >>> class Words:
    ...     def encode(self, text): return list(range(len(text.split())))
    >>> len(haystack(Words(), 100).split()) <= 100
    True
    """
    _check_positive(context_tokens)
    return "".join(_sentences(random.Random(seed), tokenizer, context_tokens, corpus)).rstrip()


def _check_positive(context_tokens: int) -> None:
    if not isinstance(context_tokens, int) or context_tokens <= 0:
        raise ValueError(f"context_tokens must be a positive int, got {context_tokens!r}.")


def _check_depth(depth: float | None, allow_none: bool = False) -> None:
    if depth is None and allow_none:
        return
    if not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a fraction in [0, 1] (0: start of the haystack, 1: its end), got {depth!r}.")


def _insert(tokenizer: Tokenizer, context_tokens: int, rng: random.Random, needles: Sequence[str],
            depths: Sequence[float], corpus: str = "essays") -> str:
    """The haystack filling `context_tokens` with `needles` inserted at whole-sentence boundaries, each at the
    boundary whose token offset is nearest to its depth times the haystack's length (Kamradt, 2023)."""
    _check_positive(context_tokens)
    needle_tokens = _count(tokenizer, " ".join(needles))
    if context_tokens < 2 * needle_tokens:
        raise ValueError(f"context_tokens={context_tokens} is too small for the needles ({needle_tokens} tokens): "
                         f"use at least {2 * needle_tokens}.")
    sents = _sentences(rng, tokenizer, context_tokens - needle_tokens, corpus)
    total = _count(tokenizer, "".join(sents))
    prefix = functools.lru_cache(maxsize=None)(lambda i: _count(tokenizer, "".join(sents[:i])))

    def boundary(depth: float) -> int:
        target = depth * total
        i = _largest(lambda n: n <= len(sents) and prefix(n) <= target)
        return i if i == len(sents) or target - prefix(i) <= prefix(i + 1) - target else i + 1

    at: dict[int, list[str]] = {}
    for needle, depth in zip(needles, depths):
        at.setdefault(boundary(depth), []).append(needle.strip() + " ")
    return "".join("".join(at.get(i, [])) + s for i, s in enumerate(sents + [""])).rstrip()


def _case(task: str, tokenizer: Tokenizer, context: str, question: str, answers: Sequence[str], depth: float | None,
          **meta: Any) -> Case:
    meta.setdefault("metric", "all")
    return Case(task, context, question, tuple(answers), _count(tokenizer, context), depth, meta)


def _numbers(rng: random.Random, k: int, digits: int) -> list[str]:
    """k distinct random numbers of `digits` digits (RULER's `generate_random_number`)."""
    return [str(n) for n in rng.sample(range(10 ** (digits - 1), 10 ** digits), k)]


def passkey(tokenizer: Tokenizer, context_tokens: int, depth: float = 0.5, seed: int = 0,
            corpus: str = "essays") -> Case:
    """A 5-digit pass key hidden at `depth` in the essays (Mohtashami & Jaggi, 2023; as in RULER's and
    LongLM's passkey retrieval, with real text as the haystack).

    Needle: "The pass key is 71432. Remember it. 71432 is the pass key."; question: "What is the pass key?".
    """
    _check_depth(depth)
    rng = random.Random(seed)
    key = _numbers(rng, 1, 5)[0]
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    context = _insert(tokenizer, context_tokens, rng, [needle], [depth], corpus)
    return _case("passkey", tokenizer, context, "What is the pass key?", [key], depth, needles=[needle],
                 depths=[depth], answer_prefix="The pass key is",
                 instruction="There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                             "it. I will quiz you about the important information there.")


def text_needle(tokenizer: Tokenizer, context_tokens: int, depth: float = 0.5, seed: int = 0,
                needle: tuple[str, str, Sequence[str]] | None = None, corpus: str = "essays") -> Case:
    """One needle at `depth` in the essays (RULER's `niah_single_2`, Kamradt's NIAH).

    Default needle (RULER): "One of the special magic numbers for <city> is: <7 digits>.", question "What are
    all the special magic numbers for <city> mentioned in the provided text?". Or pass
    `needle=(sentence, question, answers)`, e.g. `SAN_FRANCISCO`; every answer must appear in the sentence.
    """
    _check_depth(depth)
    rng = random.Random(seed)
    if needle is None:
        key, value = rng.choice(CITIES), _numbers(rng, 1, 7)[0]
        sentence, question, answers = _NIAH_NEEDLE.format(key=key, value=value), _NIAH_QUESTION.format(key=key), [value]
        meta = {"instruction": _NIAH_INSTRUCTION, "answer_prefix": _NIAH_PREFIX.format(key=key), "key": key}
    else:
        sentence, question, answers = needle
        answers = [answers] if isinstance(answers, str) else list(answers)
        if not answers or any(a.lower() not in sentence.lower() for a in answers):
            raise ValueError(f"needle: every answer must appear in the needle sentence, got {needle!r}.")
        meta = {}
    context = _insert(tokenizer, context_tokens, rng, [sentence], [depth], corpus)
    return _case("text_needle", tokenizer, context, question, answers, depth, needles=[sentence], depths=[depth],
                 **meta)


def multi_key(tokenizer: Tokenizer, context_tokens: int, depth: float | None = None, seed: int = 0,
              num_keys: int = 4, corpus: str = "essays") -> Case:
    """`num_keys` magic-number needles with different city keys; the question asks for one (RULER's
    `niah_multikey_1`: num_needle_k=4). The asked needle is at `depth` (None: one of RULER's 40 depths, like
    the distractors)."""
    _check_depth(depth, allow_none=True)
    if not isinstance(num_keys, int) or not 2 <= num_keys <= len(CITIES):
        raise ValueError(f"num_keys must be an int in [2, {len(CITIES)}], got {num_keys!r}.")
    rng = random.Random(seed)
    keys, values = rng.sample(CITIES, num_keys), _numbers(rng, num_keys, 7)
    depths = rng.sample(DEPTHS, num_keys)
    if depth is not None:
        depths[0] = depth
    needles = [_NIAH_NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
    context = _insert(tokenizer, context_tokens, rng, needles, depths, corpus)
    return _case("multi_key", tokenizer, context, _NIAH_QUESTION.format(key=keys[0]), [values[0]], depths[0],
                 needles=needles, depths=depths, key=keys[0], instruction=_NIAH_INSTRUCTION,
                 answer_prefix=_NIAH_PREFIX.format(key=keys[0]))


def multi_value(tokenizer: Tokenizer, context_tokens: int, seed: int = 0, num_values: int = 4,
                corpus: str = "essays") -> Case:
    """One city key with `num_values` magic numbers at distinct RULER depths; all must be answered (RULER's
    `niah_multivalue`: num_needle_v=4, metric string_match_all)."""
    if not isinstance(num_values, int) or not 1 <= num_values <= len(DEPTHS):
        raise ValueError(f"num_values must be an int in [1, {len(DEPTHS)}], got {num_values!r}.")
    rng = random.Random(seed)
    key, values = rng.choice(CITIES), _numbers(rng, num_values, 7)
    depths = sorted(rng.sample(DEPTHS, num_values))
    needles = [_NIAH_NEEDLE.format(key=key, value=v) for v in values]
    context = _insert(tokenizer, context_tokens, rng, needles, depths, corpus)
    return _case("multi_value", tokenizer, context, _NIAH_QUESTION.format(key=key), values, None, needles=needles,
                 depths=depths, key=key, instruction=_NIAH_INSTRUCTION, answer_prefix=_NIAH_PREFIX.format(key=key))


def variable_tracking(tokenizer: Tokenizer, context_tokens: int, seed: int = 0, num_chains: int = 1,
                      num_hops: int = 4, corpus: str = "essays") -> Case:
    """RULER's variable tracking (`vt`: num_chains=1, num_hops=4): chains "VAR ABCDE = 12345.",
    "VAR FGHIJ = VAR ABCDE.", ... in order at sorted random depths; the answers are the num_hops + 1
    variables of the first chain, whose value the question names. Other chains (other values) distract."""
    for name, value, low in (("num_chains", num_chains, 1), ("num_hops", num_hops, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < num_chains * (num_hops + 1):
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        names += [name] if name not in names else []
    values = _numbers(rng, num_chains, 5)
    needles, depths, chains = [], [], []
    for c in range(num_chains):
        chain = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        chains.append(chain)
        needles += [f"VAR {chain[0]} = {values[c]}."] + [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(chain)]
        depths += sorted(rng.uniform(0, 1) for _ in chain)
    context = _insert(tokenizer, context_tokens, rng, needles, depths, corpus)
    return _case("variable_tracking", tokenizer, context,
                 f"Question: Find all variables that are assigned the value {values[0]} in the text above.",
                 chains[0], None, needles=needles, depths=depths, chains=chains,
                 instruction="Memorize and track the chain(s) of variable assignment hidden in the following text.",
                 answer_prefix=f"Answer: According to the chain(s) of variable assignment in the text above, "
                               f"{num_hops + 1} variables are assigned the value {values[0]}, they are:")


@functools.lru_cache(maxsize=None)
def _words(corpus: str) -> tuple[str, ...]:
    """Distinct lowercase words of 4 to 10 letters from `corpus`, in order of first appearance."""
    words = re.findall(r"\b[a-z]{4,10}\b", "".join(corpus_units(corpus)))
    return tuple(dict.fromkeys(words))


def common_words(tokenizer: Tokenizer, context_tokens: int, seed: int = 0, num_common: int = 10,
                 freq_common: int = 30, freq_uncommon: int = 3, corpus: str = "essays") -> Case:
    """RULER's common words extraction (`cwe`: num_cw=10, freq_cw=30, freq_ucw=3): a shuffled numbered list
    ("1. word") where `num_common` words appear `freq_common` times each and as many uncommon words as fit
    `context_tokens` appear `freq_uncommon` times each; answer the common ones. Words come from the essays."""
    _check_positive(context_tokens)
    if not isinstance(num_common, int) or num_common < 1:
        raise ValueError(f"num_common must be a positive int, got {num_common!r}.")
    if not isinstance(freq_uncommon, int) or not isinstance(freq_common, int) or not 1 <= freq_uncommon < freq_common:
        raise ValueError(f"freq_common and freq_uncommon must be ints with 1 <= freq_uncommon < freq_common, "
                         f"got {freq_common!r} and {freq_uncommon!r}.")
    instruction = ("Below is a numbered list of words. In these words, some appear more often than others. "
                   "Memorize the ones that appear most often.")
    question = f"Question: What are the {num_common} most common words in the above list?"
    answer_prefix = f"Answer: The top {num_common} words that appear most often in the list are:"
    # No word of the prompt is an answer: echoing the prompt must not score.
    pool = [w for w in _words(corpus) if w not in f"{instruction} {question} {answer_prefix}".lower()]
    random.Random(seed).shuffle(pool)
    common = pool[:num_common]

    def build(n: int) -> str:
        words = common * freq_common + pool[num_common:num_common + n] * freq_uncommon
        random.Random(seed).shuffle(words)
        return "\n".join(f"{i + 1}. {w}" for i, w in enumerate(words))

    if _count(tokenizer, build(0)) > context_tokens:
        raise ValueError(f"context_tokens={context_tokens} is too small for {num_common} common words repeated "
                         f"{freq_common} times ({_count(tokenizer, build(0))} tokens): lower num_common or "
                         f"freq_common, or raise context_tokens.")
    most = len(pool) - num_common
    n = _largest(lambda n: n <= most and _count(tokenizer, build(n)) <= context_tokens)
    if n == most:
        raise ValueError(f"context_tokens={context_tokens} is more than the corpus' {most} distinct words fill "
                         f"({_count(tokenizer, build(n))} tokens): raise freq_uncommon or lower context_tokens.")
    return _case("common_words", tokenizer, build(n), question, common, None, num_uncommon=n,
                 instruction=instruction, answer_prefix=answer_prefix)
