"""The training input pipeline: deterministic per step, resumable, with held-out documents apart."""
import numpy as np
import pytest

from tokcomp_jax.data.corpora import corpus_documents
from tokcomp_jax.learned.data import PackedWindows, corpus_windows, split_documents


def test_batches_are_a_function_of_the_step():
    windows = PackedWindows(np.arange(1000, dtype=np.int32), window=10, batch_size=4, seed=3)
    again = PackedWindows(np.arange(1000, dtype=np.int32), window=10, batch_size=4, seed=3)
    assert windows.steps_per_epoch == 25
    for step in (0, 7, 24, 25, 80):  # resuming at any step reads what an uninterrupted run reads
        np.testing.assert_array_equal(windows.batch(step), again.batch(step))
    epoch = np.concatenate([windows.batch(step) for step in range(25)])
    assert sorted(epoch[:, 0].tolist()) == list(range(0, 1000, 10))  # every window once per epoch
    assert np.all(np.diff(epoch, axis=1) == 1)  # contiguous tokens
    assert not np.array_equal(windows.batch(0), windows.batch(25))  # a new permutation each epoch
    assert not np.array_equal(windows.batch(0), PackedWindows(windows.tokens, 10, 4, seed=4).batch(0))


def test_shifted_windows_start_each_later_epoch_at_a_new_offset():
    windows = PackedWindows(np.arange(1000, dtype=np.int32), window=10, batch_size=4, seed=3, shift=True)
    assert windows.num_windows == 99 and windows.steps_per_epoch == 24  # room for any offset in [0, 10)
    starts = [np.concatenate([windows.batch(epoch * 24 + step) for step in range(24)])[:, 0] for epoch in range(4)]
    np.testing.assert_array_equal(starts[0] % 10, 0)  # the first epoch is unshifted
    offsets = [int(epoch_starts[0] % 10) for epoch_starts in starts]
    for epoch_starts, offset in zip(starts, offsets):
        np.testing.assert_array_equal(epoch_starts % 10, offset)  # one offset per epoch
        assert len(set(epoch_starts.tolist())) == 96  # distinct windows
    assert len(set(offsets[1:])) > 1  # a new cut in later epochs
    assert np.all(np.diff(windows.batch(30), axis=1) == 1)
    np.testing.assert_array_equal(windows.batch(50), PackedWindows(windows.tokens, 10, 4, 3, shift=True).batch(50))


def test_processes_read_disjoint_rows_of_the_global_batch():
    windows = PackedWindows(np.arange(960, dtype=np.int32), window=8, batch_size=6)
    parts = [windows.batch(5, process_index=i, process_count=3) for i in range(3)]
    np.testing.assert_array_equal(np.concatenate(parts), windows.batch(5))
    with pytest.raises(ValueError, match="must split evenly over 4 processes"):
        windows.batch(0, process_index=0, process_count=4)


def test_held_out_documents_are_never_trained_on():
    documents = corpus_documents("essays")
    train, held_out = split_documents(documents, "train"), split_documents(documents, "held_out")
    assert len(held_out) == len(documents) // 10 and len(train) + len(held_out) == len(documents)
    assert not set(train) & set(held_out)


def test_corpus_windows_tokenize_the_split(smollm2):
    _, tokenizer = smollm2
    windows = corpus_windows(tokenizer, "essays", "held_out", window=256, batch_size=2)
    text = tokenizer.decode(windows.batch(0)[0].tolist())
    assert any(text[:200] in doc for doc in split_documents(corpus_documents("essays"), "held_out"))
    assert windows.num_windows > 50


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="fewer than one batch"):
        PackedWindows(np.arange(30, dtype=np.int32), window=10, batch_size=4)
    with pytest.raises(ValueError, match="window must be at least 2"):
        PackedWindows(np.arange(30, dtype=np.int32), window=1, batch_size=1)
    with pytest.raises(ValueError, match="split must be one of"):
        split_documents(["a"], "test")
