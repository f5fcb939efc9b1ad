"""The input pipeline of learned compressors: deterministic, and checkpointed by one number.

A corpus's documents (see `tokcomp_jax.data.corpus_documents`) are split into training and
held-out documents (every `held_out_every`-th one is held out, so evaluation text is never trained
on), tokenized, joined with the end-of-sequence token and cut into windows of a fixed length.
Each epoch visits the windows in a permutation drawn from `(seed, epoch)` (and, with `shift`, cuts
the stream at an offset drawn from them, so that later epochs split the text into new contexts
and continuations rather than repeat the first epoch's windows), so batch `step` is a
pure function of the step: the pipeline's whole state is the step a checkpoint stores, and a
resumed run reads exactly the batches an uninterrupted one would. In a multi-process run every
process takes its own rows of the global batch.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from tokcomp_jax.checkpoints.tokenizer import Tokenizer
from tokcomp_jax.data.corpora import corpus_documents

SPLITS = ("train", "held_out")


def split_documents(documents: Sequence[str], split: str, held_out_every: int = 10) -> list[str]:
    """The documents of `split`: "held_out" is every `held_out_every`-th one, "train" the rest."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if held_out_every < 2:
        raise ValueError(f"held_out_every must be >= 2 (one document in held_out_every is held out), "
                         f"got {held_out_every}.")
    held_out = [(index + 1) % held_out_every == 0 for index in range(len(documents))]
    return [doc for doc, out in zip(documents, held_out) if out == (split == "held_out")]


def tokenize_documents(tokenizer: Tokenizer, documents: Sequence[str]) -> np.ndarray:
    """`[n]` int32: every document's tokens followed by the end-of-sequence token."""
    eos = tokenizer.eos_ids[0]
    pieces = [np.asarray(tokenizer.encode(doc, add_special_tokens=False) + [eos], np.int32) for doc in documents]
    return np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)


@dataclasses.dataclass(frozen=True)
class PackedWindows:
    """Fixed-length windows of a token stream, served in seeded batches.

    tokens: `[n]` the stream; window: tokens per example; batch_size: examples per global batch;
    shift: every epoch after the first starts its windows at an offset in [0, window) drawn from
    `(seed, epoch)` (the first epoch's is 0).
    """

    tokens: np.ndarray
    window: int
    batch_size: int
    seed: int = 0
    shift: bool = False

    def __post_init__(self):
        if self.window < 2:
            raise ValueError(f"window must be at least 2 tokens, got {self.window}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}.")
        if self.num_windows < self.batch_size:
            raise ValueError(f"the corpus holds {self.num_windows} windows of {self.window} tokens, fewer than one "
                             f"batch of {self.batch_size}; use a shorter window, a smaller batch or more text.")

    @property
    def num_windows(self) -> int:
        """Windows per epoch: as many as fit after the largest offset when `shift` is on."""
        return (len(self.tokens) - (self.window - 1 if self.shift else 0)) // self.window

    @property
    def steps_per_epoch(self) -> int:
        return self.num_windows // self.batch_size

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        """`[batch_size / process_count, window]` the rows of global batch `step` that process
        `process_index` reads."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        if self.batch_size % process_count or not 0 <= process_index < process_count:
            raise ValueError(f"batch_size {self.batch_size} must split evenly over {process_count} processes, and "
                             f"process_index must be in [0, {process_count}); got {process_index}.")
        epoch, index = divmod(step, self.steps_per_epoch)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_windows)
        offset = int(rng.integers(self.window)) if self.shift and epoch else 0
        rows = self.batch_size // process_count
        picks = order[index * self.batch_size:][process_index * rows:(process_index + 1) * rows]
        return self.tokens[offset + picks[:, None] * self.window + np.arange(self.window)]


def corpus_windows(tokenizer: Tokenizer, corpus: str, split: str, window: int, batch_size: int, *, seed: int = 0,
                   held_out_every: int = 10, shift: bool = False) -> PackedWindows:
    """`PackedWindows` over the `split` documents of `corpus` ("essays", "shakespeare", "python")."""
    documents = split_documents(corpus_documents(corpus), split, held_out_every)
    return PackedWindows(tokenize_documents(tokenizer, documents), window, batch_size, seed, shift)
