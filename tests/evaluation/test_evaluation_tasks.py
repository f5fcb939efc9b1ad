"""Synthetic long-context tasks (RULER, NIAH), their string-match scoring and the JSONL reader."""
import collections
import re

import pytest

from tokcomp_jax.data.corpora import corpus_units
from tokcomp_jax.evaluation import data, scoring, tasks
from tokcomp_jax.evaluation.tasks import Case


class Words:
    """A whitespace tokenizer stand-in."""

    def encode(self, text):
        return [len(w) for w in text.split()]


class Chars:
    """A character tokenizer stand-in (a very different token length)."""

    def encode(self, text):
        return [ord(c) for c in text]


TOKENIZERS = {"words": (Words(), 3000), "chars": (Chars(), 12000)}
NEEDLE_TASKS = {
    "passkey": lambda tok, n, seed=0: tasks.passkey(tok, n, seed=seed),
    "text_needle": lambda tok, n, seed=0: tasks.text_needle(tok, n, seed=seed),
    "san_francisco": lambda tok, n, seed=0: tasks.text_needle(tok, n, 0.3, seed, needle=tasks.SAN_FRANCISCO),
    "multi_key": lambda tok, n, seed=0: tasks.multi_key(tok, n, seed=seed),
    "multi_value": lambda tok, n, seed=0: tasks.multi_value(tok, n, seed=seed),
    "variable_tracking": lambda tok, n, seed=0: tasks.variable_tracking(tok, n, seed=seed, num_chains=2),
    "common_words": lambda tok, n, seed=0: tasks.common_words(tok, n, seed=seed),
}


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("make", ["passkey", "text_needle", "multi_key"])
def test_needle_at_asked_depth(make, depth, tokenizer):
    tok, n = TOKENIZERS[tokenizer]
    case = getattr(tasks, make)(tok, n, depth, seed=7)
    assert case.depth == depth
    asked = case.meta["needles"][0]
    assert case.context.count(asked) == 1
    offset = len(tok.encode(case.context[:case.context.index(asked)]))
    assert offset / case.context_tokens == pytest.approx(depth, abs=0.03)


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_context_length_and_determinism(task, tokenizer):
    tok, n = TOKENIZERS[tokenizer]
    case = NEEDLE_TASKS[task](tok, n)
    assert case.context_tokens == len(tok.encode(case.context))
    assert 0.97 * n <= case.context_tokens <= n
    again, other = NEEDLE_TASKS[task](tok, n), NEEDLE_TASKS[task](tok, n, seed=1)
    assert again == case and again.meta == case.meta
    assert other.context != case.context
    if task != "san_francisco":
        assert other.answers != case.answers
    assert case.prompt().startswith(case.meta.get("instruction", "")) and case.prompt().endswith(case.question)


def test_haystack_is_whole_sentences_of_essays():
    text = tasks.haystack(Words(), 500, seed=3)
    assert 450 <= len(text.split()) <= 500 and text[-1] in ".!?\"')]"
    corpus = " ".join("".join(corpus_units("essays")).split())
    assert " ".join(text.split()) in corpus and "Before college the two main things I worked on" in corpus
    assert tasks.haystack(Words(), 500, seed=3) == text != tasks.haystack(Words(), 500, seed=4)


@pytest.mark.parametrize("corpus, marker", [("shakespeare", "by William Shakespeare"),
                                            ("python", "def __init__(self")])
def test_other_corpora_hide_needles_at_depth(corpus, marker):
    tok = Words()
    whole = "".join(corpus_units(corpus))
    assert marker in whole and len(whole.split()) > 200_000
    for depth in (0.0, 0.5, 0.9):
        case = tasks.passkey(tok, 2000, depth, seed=2, corpus=corpus)
        needle = case.meta["needles"][0]
        assert 0.97 * 2000 <= case.context_tokens <= 2000
        assert len(tok.encode(case.context[:case.context.index(needle)])) / case.context_tokens == \
            pytest.approx(depth, abs=0.03)
        assert " ".join(case.context.replace(needle, "").split()) in " ".join(whole.split())
    assert tasks.passkey(tok, 2000, 0.9, seed=2, corpus=corpus) == case  # deterministic
    assert tasks.common_words(tok, 3000, corpus=corpus).answers != tasks.common_words(tok, 3000).answers
    with pytest.raises(ValueError, match="corpus must be one of essays, shakespeare, python"):
        tasks.haystack(tok, 100, corpus="poems")


def test_needles_answer_the_question():
    tok, n = TOKENIZERS["words"]
    case = tasks.passkey(tok, n, seed=4)
    (key,) = case.answers
    assert re.fullmatch(r"\d{5}", key) and f"The pass key is {key}. Remember it. {key} is the pass key." in case.context

    for case in (tasks.text_needle(tok, n, seed=4), tasks.multi_key(tok, n, seed=4), tasks.multi_value(tok, n, seed=4)):
        key = case.meta["key"]
        assert case.question == f"What are all the special magic numbers for {key} mentioned in the provided text?"
        found = re.findall(rf"One of the special magic numbers for {key} is: (\d{{7}})\.", case.context)
        assert tuple(found) == case.answers  # in order, and no other needle has the asked key
    case = tasks.multi_key(tok, n, seed=4, num_keys=5)
    assert len(re.findall(r"One of the special magic numbers for [A-Za-z ]+ is: \d{7}\.", case.context)) == 5

    case = tasks.text_needle(tok, n, seed=4, needle=tasks.SAN_FRANCISCO)
    assert tasks.SAN_FRANCISCO[0] in case.context and case.answers == ("sandwich", "Dolores Park")


def test_variable_tracking_chain():
    case = tasks.variable_tracking(Words(), 3000, seed=5, num_chains=2, num_hops=3)
    value = re.search(r"assigned the value (\d{5}) in the text above", case.question).group(1)
    first, *rest = case.answers
    assert len(case.answers) == 4 and all(re.fullmatch("[A-Z]{5}", v) for v in case.answers)
    lines = [f"VAR {first} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(case.answers, rest)]
    positions = [case.context.index(line) for line in lines]
    assert positions == sorted(positions)
    # Every other variable resolves to the distractor chain's different value.
    assignments = dict(re.findall(r"VAR ([A-Z]{5}) = (?:VAR )?([A-Z]{5}|\d{5})\.", case.context))
    resolve = lambda v: v if v.isdigit() else resolve(assignments[v])
    assert {v for v in assignments if resolve(v) == value} == set(case.answers)
    assert len(assignments) == 8


def test_common_words_counts():
    case = tasks.common_words(Words(), 3000, seed=2)
    counts = collections.Counter(re.findall(r"^\d+\. (\w+)$", case.context, flags=re.MULTILINE))
    assert sum(counts.values()) == case.context.count("\n") + 1
    assert {w for w, c in counts.items() if c == 30} == set(case.answers) and len(case.answers) == 10
    assert set(counts.values()) == {30, 3} and len(counts) == 10 + case.meta["num_uncommon"]
    assert case.question == "Question: What are the 10 most common words in the above list?"


@pytest.mark.parametrize("call, match", [
    (lambda: tasks.passkey(Words(), 2000, depth=-0.1), "depth"),
    (lambda: tasks.passkey(Words(), 2000, depth=1.5), "depth"),
    (lambda: tasks.multi_key(Words(), 2000, depth="middle"), "depth"),
    (lambda: tasks.passkey(Words(), 20), "context_tokens"),
    (lambda: tasks.multi_value(Words(), 40), "context_tokens"),
    (lambda: tasks.variable_tracking(Words(), 30), "context_tokens"),
    (lambda: tasks.common_words(Words(), 500), "context_tokens"),
    (lambda: tasks.haystack(Words(), 0), "context_tokens"),
    (lambda: tasks.multi_key(Words(), 2000, num_keys=1), "num_keys"),
    (lambda: tasks.variable_tracking(Words(), 2000, num_hops=0), "num_hops"),
    (lambda: tasks.text_needle(Words(), 2000, needle=("A cat sat.", "Who sat?", ("dog",))), "needle"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_score_passkey_variants():
    case = Case("passkey", "...", "What is the pass key?", ("71432",), 3)
    for right in ["71432", "The pass key is 71432.", "the pass key is 71,432", "71 432", "Pass key: 71'432!"]:
        assert scoring.score(case, right) == 1.0, right
    for wrong in ["71433", "714320", "The pass key is 1714321.", "71.433", "7143", "", "71,43,2"]:
        assert scoring.score(case, wrong) == 0.0, wrong


def test_score_all_and_part():
    case = Case("multi_value", "...", "?", ("1234567", "7654321", "1111111", "2222222"), 3)
    assert scoring.score(case, "1234567, 7654321, 1111111 and 2222222") == 1.0
    assert scoring.score(case, "The numbers are 1234567 and 7,654,321.") == 0.5
    assert scoring.score(case, "1234567,7654321") == 0.5  # a list without spaces is not one grouped number
    assert scoring.score(case, "1234567", metric="part") == 1.0
    assert scoring.score(case, "nothing", metric="part") == 0.0
    sf = tasks.text_needle(Words(), 500, needle=tasks.SAN_FRANCISCO)
    assert scoring.score(sf, "EAT A SANDWICH in dolores park.") == 1.0
    assert scoring.score(sf, "Have a sandwich.") == 0.5
    with pytest.raises(ValueError, match="metric"):
        scoring.score(case, "x", metric="any")


def test_score_generated_cases():
    for make in NEEDLE_TASKS.values():
        case = make(Words(), 1500)
        assert scoring.score(case, " ".join(case.answers)) == 1.0
        assert scoring.score(case, case.meta.get("answer_prefix", "") + " I do not know.") == 0.0


def test_read_jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"context": "Ann lives in Oslo.", "question": "Where?", "answers": "Oslo"}\n\n   \n'
                    '{"context": "c", "question": "q", "answers": ["a", "b"], "task": "qa", "id": 7}\n')
    first, second = data.read_jsonl(path, tokenizer=Words())
    assert first == Case("user", "Ann lives in Oslo.", "Where?", ("Oslo",), 4)
    assert (second.task, second.answers, second.meta) == ("qa", ("a", "b"), {"id": 7, "metric": "part"})
    assert scoring.score(second, "It is b.") == 1.0
    assert data.read_jsonl(path)[0].context_tokens == 0


@pytest.mark.parametrize("row, match", [
    ('{"context": "c", "question": "q", "answers": ["a"]', "not valid JSON"),
    ('{"context": "c", "answers": ["a"]}', "missing key 'question'"),
    ('{"context": "c", "question": "q", "answers": 3}', "'answers'"),
    ('{"context": "c", "question": "q", "answers": []}', "'answers'"),
    ('{"context": 1, "question": "q", "answers": "a"}', "'context' must be a string"),
    ('["c", "q", "a"]', "JSON object"),
    ('{"context": "c", "question": "q", "answers": "a", "metric": "some"}', "metric"),
])
def test_read_jsonl_errors_name_file_and_line(tmp_path, row, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "c", "question": "q", "answers": "a"}\n\n' + row + "\n")
    with pytest.raises(ValueError, match=match) as error:
        data.read_jsonl(path)
    assert "bad.jsonl, line 3" in str(error.value)
