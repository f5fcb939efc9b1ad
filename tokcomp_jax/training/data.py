"""Training batches: data sources as pure functions of the step, assembled into global arrays."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from tokcomp_jax.learned.data import PackedWindows
from tokcomp_jax.sharding import logical_to_sharding


class DataSource(Protocol):
    """What a task trains on. `batch(step, ...)` must be a pure function of the step: a checkpoint's
    step is then the whole state of the input pipeline."""

    tokens_per_batch: int  # tokens read per global batch (for tokens/s)
    num_batches: int       # distinct global batches before their order repeats

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> Mapping[str, np.ndarray]:
        """The rows of global batch `step` that process `process_index` reads: arrays `[rows, ...]`."""


@dataclasses.dataclass(frozen=True)
class TokenWindows:
    """`PackedWindows` as a `DataSource` of `{"ids": [rows, window]}` batches."""

    windows: PackedWindows

    @property
    def tokens_per_batch(self) -> int:
        return self.windows.batch_size * self.windows.window

    @property
    def num_batches(self) -> int:
        return self.windows.steps_per_epoch

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        return {"ids": self.windows.batch(step, process_index, process_count)}


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255 and 256 as end of sequence: a tokenizer that needs no files.

    >>> tokenizer = ByteTokenizer()
    >>> tokenizer.encode("hé"), tokenizer.decode([104, 195, 169, 256])
    ([104, 195, 169], 'hé')
    """

    vocab_size = 257
    eos_ids = (256,)
    bos_id = None
    pad_id = 256

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def batch_shardings(batch: Mapping[str, np.ndarray], mesh: Mesh, process_count: int = 1):
    """Shardings of a global batch whose local rows are `batch`: rows over ("data", "fsdp")."""
    return {key: logical_to_sharding(("batch",) + (None,) * (x.ndim - 1), mesh,
                                     shape=(x.shape[0] * process_count,) + x.shape[1:])
            for key, x in batch.items()}


def global_batch(local: Mapping[str, np.ndarray], shardings) -> dict[str, jax.Array]:
    """The global arrays of which this process holds the rows `local`."""
    return {key: jax.make_array_from_process_local_data(shardings[key], np.asarray(x)) for key, x in local.items()}
