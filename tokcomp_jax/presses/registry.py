"""Every press by name, built for a model: the ratio-only factories of `PRESSES` and those that need
the model (its number of layers, or Q-Filters calibrated on it through its public call)."""
from __future__ import annotations

import inspect
from collections.abc import Sequence

from tokcomp_jax.presses.a2sf import a2sf
from tokcomp_jax.presses.adakv import adakv
from tokcomp_jax.presses.base import Press
from tokcomp_jax.presses.expected_attention import expected_attention
from tokcomp_jax.presses.keydiff import keydiff
from tokcomp_jax.presses.knorm import knorm
from tokcomp_jax.presses.lacache import lacache
from tokcomp_jax.presses.observed_attention import observed_attention
from tokcomp_jax.presses.pyramidkv import pyramidkv
from tokcomp_jax.presses.qfilter import calibrate_qfilters, qfilter
from tokcomp_jax.presses.random_press import random
from tokcomp_jax.presses.snapkv import snapkv
from tokcomp_jax.presses.streaming_llm import streaming_llm
from tokcomp_jax.presses.tova import tova

# Presses by name (for the command line and the evaluation harness): factory(ratio) -> Press.
PRESSES = {"streaming_llm": streaming_llm, "knorm": knorm, "snapkv": snapkv, "observed_attention": observed_attention,
           "tova": tova, "keydiff": keydiff, "random": random, "expected_attention": expected_attention,
           "a2sf": a2sf, "adakv_snapkv": lambda ratio=None, tokens=None: adakv(snapkv(ratio, tokens=tokens))}
# Presses that need the model: factory(ratio, model, filters) -> Press.
MODEL_PRESSES = {
    "pyramidkv": lambda ratio, model, _: pyramidkv(ratio, num_layers=model.config.num_layers),
    "lacache": lambda ratio, model, _: lacache(ratio, num_layers=model.config.num_layers),
    "qfilter": lambda ratio, model, filters: qfilter(ratio, filters=filters),
}
# The full cache, as a press name.
NO_PRESS = "none"
PRESS_NAMES = (NO_PRESS, *PRESSES, *MODEL_PRESSES)


def make_press(name: str, ratio: float | None = None, model=None, calibration_ids: Sequence[int] | None = None, *,
               tokens: int | None = None, qfilters=None) -> Press | None:
    """The press called `name` (one of `PRESS_NAMES`; "none" gives None, the full cache) removing
    `ratio` of each row's entries, or keeping `tokens` per row and KV head. pyramidkv and lacache
    take the model's depth; qfilter takes `qfilters` (from `calibrate_qfilters`; estimate them once
    for many presses) or estimates them on `calibration_ids` with the model.

    >>> import tokcomp_jax as tc
    >>> make_press("pyramidkv", 0.5, tc.testing.tiny_llama()) is tc.presses.pyramidkv(0.5, num_layers=2)
    True
    """
    if name == NO_PRESS:
        return None
    if name not in PRESSES and name not in MODEL_PRESSES:
        raise ValueError(f"press {name!r} is unknown; choose one of {', '.join(PRESS_NAMES)}.")
    if tokens is not None:
        if name not in PRESSES or "tokens" not in inspect.signature(PRESSES[name]).parameters:
            raise ValueError(f"press {name!r} takes a ratio, not a budget in tokens.")
        return PRESSES[name](tokens=tokens)
    if name in PRESSES:
        return PRESSES[name](ratio)
    if model is None:
        raise ValueError(f"press {name!r} is built for a model: pass model=.")
    if name == "qfilter" and qfilters is None:
        if calibration_ids is None:
            raise ValueError("the qfilter press needs qfilters= (from calibrate_qfilters) or calibration_ids: "
                             "token ids of text to estimate its filters on.")
        qfilters = calibrate_qfilters(model, [list(calibration_ids)])
    return MODEL_PRESSES[name](ratio, model, qfilters)
