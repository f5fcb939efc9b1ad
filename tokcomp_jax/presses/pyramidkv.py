"""PyramidKV (Cai et al., 2024, arXiv:2406.02069): attention narrows with depth ("pyramidal
information funnelling"), so lower layers keep more entries and upper layers fewer, for the same
total; within a layer the entries are chosen by SnapKV's window attention."""
from __future__ import annotations


from tokcomp_jax.presses.base import Budget, Press, keep_top, no_state, per_length, press_factory, prompt_slots
from tokcomp_jax.presses.snapkv import snapkv_scores


def layer_budget(length: int, layer_index: int, num_layers: int, ratio: float, window_size: int,
                 beta: int) -> int:
    """Entries layer `layer_index` keeps out of `length` (kvpress `PyramidKVPress.get_layer_budget`,
    after KVCache-Factory): budgets fall linearly from the first layer to the last, the last getting
    1/beta of the mean budget above the window and the first the rest, so that the mean over the
    layers is `length * (1 - ratio)`; the first layer's budget is capped at `length - window_size`
    (the last's grows to compensate); where that gives a budget outside [window_size, length], every
    layer keeps `max(1, round(length * (1 - ratio)))` (SnapKV)."""
    if ratio == 0:
        return length  # kvpress leaves the cache alone
    max_capacity_prompt = window_size + length * (1 - ratio)
    min_num = (max_capacity_prompt - window_size) / beta
    max_num = (max_capacity_prompt - window_size) * 2 - min_num
    if max_num >= length - window_size:
        max_num = length - window_size
        min_num = (max_capacity_prompt - window_size) * 2 - max_num
    if not (length >= max_num >= min_num >= window_size):
        return max(1, round(length * (1 - ratio)))
    steps = (max_num - min_num) / (num_layers - 1) if num_layers > 1 else 0.0
    return round(max_num - layer_index * steps)


@press_factory
def pyramidkv(ratio: float | None = None, *, num_layers: int, window_size: int = 64, kernel_size: int = 5,
              beta: int = 20) -> Press:
    """PyramidKV (Cai et al., 2024, arXiv:2406.02069), as kvpress `PyramidKVPress` (window_size=64,
    kernel_size=5, beta=20): SnapKV scores, and per-layer budgets from `layer_budget` for each
    row's own length. `num_layers` is the model's (`model.config.num_layers`; kvpress reads
    `config.num_hidden_layers`), which the budgets need.

    Each layer's cache comes out with its own capacity, the largest budget of that layer over the
    lengths up to the prompt's plus the room asked for, so the cache's memory follows the pyramid.
    """
    if ratio is None:
        raise ValueError("pyramidkv needs ratio, the fraction of the entries removed on average over the layers.")
    Budget(ratio)  # validates ratio
    if num_layers < 1 or window_size < 1 or kernel_size < 1 or kernel_size % 2 == 0 or beta < 1:
        raise ValueError(f"num_layers, window_size and beta must be >= 1 and kernel_size odd, got {num_layers}, "
                         f"{window_size}, {beta}, {kernel_size}.")

    def compress(layer, obs, state, **extra):
        del extra
        if not obs.last_chunk:
            return layer, state
        if not 0 <= obs.layer_index < num_layers:
            raise ValueError(f"pyramidkv was made for num_layers={num_layers} but layer {obs.layer_index} came.")
        table = [layer_budget(n, obs.layer_index, num_layers, ratio, window_size, beta)
                 for n in range(prompt_slots(layer, obs) + 1)]
        capacity = max(table) + obs.room
        n_kept = per_length(table, layer.lengths)
        return keep_top(layer, snapkv_scores(layer, obs, window_size, kernel_size), n_kept, capacity), state

    return Press(init=no_state, compress=compress)
