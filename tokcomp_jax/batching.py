"""Batches of token ids: right padding, validation, and the lengths compiled programs share."""
from __future__ import annotations

import numpy as np

DEFAULT_CHUNK_SIZE = 512  # tokens a prompt is run in at a time
CAPACITY_QUANTUM = 256  # cache slots that capacities are rounded up to (the XLA attention's block)


def pad_batch(ids, lengths=None, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Turns token ids (one list, a list of lists of any lengths, or an `[B, S]` array) into a
    right-padded `[B, S]` int32 array and the `[B]` lengths of its rows."""
    if isinstance(ids, (list, tuple)) and ids and isinstance(ids[0], (list, tuple, np.ndarray)):
        if lengths is not None:
            raise ValueError("lengths is only taken with an [B, S] array of ids; a list of lists carries its own.")
        rows = [np.asarray(row) for row in ids]
        empty = [index for index, row in enumerate(rows) if row.size == 0]
        if empty:
            raise ValueError(f"ids: row {empty[0]} is empty; every prompt needs at least one token.")
        if any(row.ndim != 1 or (row.size and not np.issubdtype(row.dtype, np.integer)) for row in rows):
            raise ValueError("ids must be rows of integer token ids.")
        lengths = np.array([row.size for row in rows], np.int32)
        ids = np.full((len(rows), lengths.max()), pad_id, np.int32)
        for padded_row, row in zip(ids, rows):
            padded_row[:row.size] = row
    ids = np.asarray(ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be non-empty integer token ids shaped [B, S], got shape {ids.shape} "
                         f"and dtype {ids.dtype}.")
    lengths = np.full(ids.shape[0], ids.shape[1], np.int32) if lengths is None else np.asarray(lengths, np.int32)
    if lengths.shape != (ids.shape[0],) or lengths.min() < 1 or lengths.max() > ids.shape[1]:
        raise ValueError(f"lengths must hold one value in [1, {ids.shape[1]}] per row of ids, got {lengths}.")
    return ids.astype(np.int32), lengths


def padded_length(n: int, chunk_size: int) -> int:
    """Rounds a length up to a power of two up to `chunk_size`, to a multiple of it beyond, so that
    prompts of similar lengths share one compiled program."""
    if n > chunk_size:
        return -(-n // chunk_size) * chunk_size
    return 1 << max(n - 1, 0).bit_length()


def quantized(n: int, quantum: int = CAPACITY_QUANTUM) -> int:
    """`n` rounded up to a multiple of `quantum`: cache capacities bucketed, so that batches of
    similar lengths share their compiled programs."""
    return -(-n // quantum) * quantum


def check_token_ids(ids: np.ndarray, vocab_size: int) -> None:
    """Raises unless every id of `ids` is a token id of a vocabulary of `vocab_size`."""
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"ids must be token ids in [0, {vocab_size}), got values in [{ids.min()}, {ids.max()}].")
