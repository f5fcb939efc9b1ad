"""The KV cache: per-layer keys/values compacted to the front of a static capacity.

Each (row, KV head) holds `lengths[b, h]` valid entries in slots `[0, lengths[b, h])`; the original
token position of every entry is kept in `positions` so that RoPE-aware methods and reports know
which tokens survived compression. Layers may have different capacities (pyramid budgets), and a
layer compressed with a budget per KV head (AdaKV) is a `RaggedLayerCache`, whose memory follows
the sum of the heads' budgets.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int


def _nbytes(x) -> int:
    return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's cache.

    keys, values: `[B, Hkv, C, D]`; positions: `[B, Hkv, C]` original token positions (-1 where
    empty); lengths: `[B, Hkv]` number of valid entries, compacted to the front.
    """

    keys: Float[Array, "B Hkv C D"]
    values: Float[Array, "B Hkv C D"]
    positions: Int[Array, "B Hkv C"]
    lengths: Int[Array, "B Hkv"]

    @classmethod
    def empty(cls, batch: int, num_kv_heads: int, capacity: int, head_dim: int,
              dtype=jnp.float32) -> "LayerCache":
        """An empty cache of `capacity` slots per (row, KV head)."""
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}.")
        shape = (batch, num_kv_heads, capacity, head_dim)
        return cls(
            keys=jnp.zeros(shape, dtype),
            values=jnp.zeros(shape, dtype),
            positions=jnp.full(shape[:3], -1, jnp.int32),
            lengths=jnp.zeros(shape[:2], jnp.int32),
        )

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held by this layer's arrays (keys, values, positions, lengths)."""
        return sum(_nbytes(x) for x in (self.keys, self.values, self.positions, self.lengths))

    def valid_mask(self) -> Bool[Array, "B Hkv C"]:
        """True for the slots that hold an entry."""
        return jnp.arange(self.capacity) < self.lengths[..., None]

    def head_positions(self) -> Int[Array, "B Hkv C"]:
        """Each KV head's view of the slots: the entry's position, -1 where it holds none."""
        return self.positions

    def nonfinite_rows(self) -> Bool[Array, "B"]:
        """True for the rows whose entries (keys or values, valid slots) hold a NaN or inf."""
        bad = ~(jnp.isfinite(self.keys).all(-1) & jnp.isfinite(self.values).all(-1))  # [B, Hkv, C]
        return (bad & self.valid_mask()).any(axis=(1, 2))

    def free_slots(self) -> Int[Array, "B Hkv"]:
        """How many more entries each (row, KV head) can take."""
        return self.capacity - self.lengths

    def append(self, keys: Float[Array, "B Hkv T D"], values: Float[Array, "B Hkv T D"],
               positions: Int[Array, "B T"], valid: Bool[Array, "B T"]) -> "LayerCache":
        """Writes the `valid` ones of T new entries after each (row, head)'s last entry, in order.

        Entries past the capacity are dropped: callers size the cache (see `KVCache.check_room`).
        """
        batch, heads, _, _ = keys.shape
        offsets = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1  # [B, T]
        slots = self.lengths[:, :, None] + offsets[:, None, :]  # [B, Hkv, T]
        slots = jnp.where(valid[:, None, :], slots, self.capacity)  # invalid tokens: dropped
        rows = jnp.arange(batch)[:, None, None]
        kv_heads = jnp.arange(heads)[None, :, None]
        index = (rows, kv_heads, slots)
        positions = jnp.broadcast_to(positions[:, None, :], slots.shape).astype(jnp.int32)
        return LayerCache(
            keys=self.keys.at[index].set(keys.astype(self.keys.dtype), mode="drop"),
            values=self.values.at[index].set(values.astype(self.values.dtype), mode="drop"),
            positions=self.positions.at[index].set(positions, mode="drop"),
            lengths=self.lengths + jnp.sum(valid, axis=1, dtype=jnp.int32)[:, None],
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RaggedLayerCache:
    """One layer's cache with a budget of its own per (row, KV head) (AdaKV), stored ragged.

    Each row's entries share one pool of N slots: KV head h holds `lengths[b, h]` entries from slot
    `starts[b, h]` on, in token order, and its segment ends where the next head's starts (the last
    head's at N), the free slots of a segment taking that head's new entries. keys, values:
    `[B, N, D]`; positions: `[B, N]` (-1 where empty); starts, lengths: `[B, Hkv]`.
    """

    keys: Float[Array, "B N D"]
    values: Float[Array, "B N D"]
    positions: Int[Array, "B N"]
    starts: Int[Array, "B Hkv"]
    lengths: Int[Array, "B Hkv"]

    @property
    def capacity(self) -> int:
        """Slots of each row's pool (all heads together)."""
        return self.keys.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held by this layer's arrays (keys, values, positions, starts, lengths)."""
        return sum(_nbytes(x) for x in (self.keys, self.values, self.positions, self.starts, self.lengths))

    def segment_ends(self) -> Int[Array, "B Hkv"]:
        """One past the last slot of each head's segment."""
        end = jnp.full_like(self.starts[:, :1], self.capacity)
        return jnp.concatenate([self.starts[:, 1:], end], axis=1)

    def valid_mask(self) -> Bool[Array, "B Hkv N"]:
        """True where a slot holds an entry of that KV head."""
        slot = jnp.arange(self.capacity)
        starts = self.starts[..., None]
        return (slot >= starts) & (slot < starts + self.lengths[..., None])

    def head_positions(self) -> Int[Array, "B Hkv N"]:
        """Each KV head's view of the pool: its entries' positions, -1 elsewhere."""
        return jnp.where(self.valid_mask(), self.positions[:, None, :], -1)

    def nonfinite_rows(self) -> Bool[Array, "B"]:
        """True for the rows whose entries (keys or values, valid slots) hold a NaN or inf."""
        bad = ~(jnp.isfinite(self.keys).all(-1) & jnp.isfinite(self.values).all(-1))  # [B, N]
        return (bad & self.valid_mask().any(axis=1)).any(axis=1)

    def free_slots(self) -> Int[Array, "B Hkv"]:
        """How many more entries each (row, KV head) can take."""
        return self.segment_ends() - self.starts - self.lengths

    def append(self, keys: Float[Array, "B Hkv T D"], values: Float[Array, "B Hkv T D"],
               positions: Int[Array, "B T"], valid: Bool[Array, "B T"]) -> "RaggedLayerCache":
        """Writes the `valid` ones of T new entries after each (row, head)'s last entry, in order;
        entries past the end of the head's segment are dropped (see `KVCache.check_room`)."""
        batch = keys.shape[0]
        offsets = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1  # [B, T]
        slots = (self.starts + self.lengths)[:, :, None] + offsets[:, None, :]  # [B, Hkv, T]
        fits = valid[:, None, :] & (slots < self.segment_ends()[:, :, None])
        index = (jnp.arange(batch)[:, None, None], jnp.where(fits, slots, self.capacity))
        positions = jnp.broadcast_to(positions[:, None, :], slots.shape).astype(jnp.int32)
        return RaggedLayerCache(
            keys=self.keys.at[index].set(keys.astype(self.keys.dtype), mode="drop"),
            values=self.values.at[index].set(values.astype(self.values.dtype), mode="drop"),
            positions=self.positions.at[index].set(positions, mode="drop"),
            starts=self.starts,
            lengths=self.lengths + jnp.sum(fits, axis=2, dtype=jnp.int32),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """The whole model's cache: one `LayerCache` per layer and the tokens seen per row.

    `num_seen[b]` counts the tokens row b has processed, which is the position of its next token
    whatever compression removed from the layers.

    >>> import tokcomp_jax as tc
    >>> cache = tc.KVCache.empty(num_layers=2, batch=1, num_kv_heads=3, capacity=16, head_dim=64)
    >>> cache.nbytes
    49564
    """

    layers: tuple[LayerCache | RaggedLayerCache, ...]
    num_seen: Int[Array, "B"]

    @classmethod
    def empty(cls, num_layers: int, batch: int, num_kv_heads: int, capacity: int | Sequence[int],
              head_dim: int, dtype=jnp.float32) -> "KVCache":
        """An empty cache; `capacity` is one int or one per layer."""
        capacities = [capacity] * num_layers if isinstance(capacity, int) else list(capacity)
        if len(capacities) != num_layers:
            raise ValueError(f"capacity has {len(capacities)} entries, expected one per layer ({num_layers}).")
        return cls(
            layers=tuple(LayerCache.empty(batch, num_kv_heads, c, head_dim, dtype) for c in capacities),
            num_seen=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def batch_size(self) -> int:
        return self.num_seen.shape[0]

    @property
    def capacities(self) -> tuple[int, ...]:
        return tuple(layer.capacity for layer in self.layers)

    @property
    def positions(self) -> tuple[Int[Array, "B Hkv C"], ...]:
        """Original token positions of the entries, one `[B, Hkv, C_l]` array per layer (-1 where a
        slot holds none; see `RaggedLayerCache.head_positions` for per-head budgets)."""
        return tuple(layer.head_positions() for layer in self.layers)

    @property
    def lengths(self) -> Int[Array, "L B Hkv"]:
        """Valid entries per layer, row and KV head."""
        return jnp.stack([layer.lengths for layer in self.layers])

    @property
    def nbytes(self) -> int:
        """Bytes the cache really holds (all layers' arrays plus `num_seen`)."""
        return sum(layer.nbytes for layer in self.layers) + _nbytes(self.num_seen)

    def entry_nbytes(self) -> np.ndarray:
        """`[B]` bytes of the entries each row holds (its keys, values and positions in valid slots,
        all layers), whatever the allocated capacity: what a compressed cache costs per row."""
        per_entry = [2 * layer.keys.shape[-1] * layer.keys.dtype.itemsize + layer.positions.dtype.itemsize
                     for layer in self.layers]
        held = np.asarray(self.lengths).sum(axis=2, dtype=np.int64)  # [L, B]
        return (held * np.asarray(per_entry, np.int64)[:, None]).sum(axis=0)

    def nonfinite(self) -> np.ndarray:
        """`[L, B]` True where a layer's entries of a row hold a NaN or inf (one device-to-host copy)."""
        return np.asarray(_nonfinite(self))

    def free_slots(self) -> np.ndarray:
        """`[L]` the most entries that every (row, KV head) of each layer can still take (one
        device-to-host copy)."""
        return np.asarray(jnp.stack([jnp.min(layer.free_slots()) for layer in self.layers]))

    def check_room(self, new_tokens: int) -> None:
        """Raises if some (row, layer, head) cannot take `new_tokens` more entries."""
        for index, free in enumerate(self.free_slots()):
            if new_tokens > free:
                raise ValueError(
                    f"the cache is full: layer {index} has room for {free} more entries per KV head and "
                    f"{new_tokens} more were asked for; allocate a larger `capacity` or compress the cache."
                )


@jax.jit
def _nonfinite(cache: KVCache) -> Bool[Array, "L B"]:
    return jnp.stack([layer.nonfinite_rows() for layer in cache.layers])
