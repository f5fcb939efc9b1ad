"""Composition of presses: one after another (`chain`) and one per layer (`per_layer`)."""
from __future__ import annotations

from typing import Mapping, Sequence

from tokcomp_jax.presses.base import Press, press_factory


@press_factory
def chain(*presses: Press) -> Press:
    """Applies `presses` in order to each layer, each keeping its own state; a press that keeps a
    fraction of the entries keeps it of what the previous ones left.

    >>> import tokcomp_jax as tc
    >>> press = tc.presses.chain(tc.presses.knorm(0.5), tc.presses.streaming_llm(0.5))
    """
    if not presses or not all(isinstance(p, Press) for p in presses):
        raise ValueError("chain takes one or more presses, e.g. chain(knorm(0.5), snapkv(0.5)).")

    def init(layer, layer_index):
        return tuple(p.init(layer, layer_index) for p in presses)

    def compress(layer, obs, states, **extra):
        new_states = []
        for press, state in zip(presses, states):
            layer, state = press.compress(layer, obs, state, **extra)
            new_states.append(state)
        return layer, tuple(new_states)

    return Press(init, compress)


def per_layer(assignment: Mapping[int, Press] | Sequence[Press | None], default: Press | None = None) -> Press:
    """Applies `assignment[layer_index]` to each layer (None: no press) and `default` (or
    nothing) to the layers it does not name.

    >>> import tokcomp_jax as tc
    >>> press = tc.presses.per_layer({0: tc.presses.knorm(0.25)}, default=tc.presses.snapkv(0.5))
    """
    items = assignment.items() if isinstance(assignment, Mapping) else enumerate(assignment)
    pairs = tuple(sorted((int(i), p) for i, p in items))
    if not all(p is None or isinstance(p, Press) for _, p in pairs + ((-1, default),)):
        raise ValueError("per_layer takes {layer_index: press} (or a list with a press or None per layer).")
    return _per_layer(pairs, default)


@press_factory
def _per_layer(pairs: tuple[tuple[int, Press], ...], default: Press | None) -> Press:
    chosen = dict(pairs)

    def press_for(layer_index):
        return chosen.get(layer_index, default)

    def init(layer, layer_index):
        press = press_for(layer_index)
        return None if press is None else press.init(layer, layer_index)

    def compress(layer, obs, state, **extra):
        press = press_for(obs.layer_index)
        return (layer, state) if press is None else press.compress(layer, obs, state, **extra)

    return Press(init, compress)
