"""KV-cache compression methods ("presses"): factories returning pure `Press` pairs.

>>> import tokcomp_jax as tc
>>> press = tc.presses.snapkv(ratio=0.5)
>>> press is tc.presses.snapkv(ratio=0.5)  # equal presses share one compiled program
True
"""
from tokcomp_jax.presses.a2sf import a2sf
from tokcomp_jax.presses.adakv import adakv
from tokcomp_jax.presses.base import Budget, Observation, Press, Scorer, keep_top, scorer_press
from tokcomp_jax.presses.compose import chain, per_layer
from tokcomp_jax.presses.expected_attention import expected_attention
from tokcomp_jax.presses.keydiff import keydiff
from tokcomp_jax.presses.knorm import knorm
from tokcomp_jax.presses.lacache import lacache
from tokcomp_jax.presses.observed_attention import h2o, observed_attention
from tokcomp_jax.presses.online import chunkwise
from tokcomp_jax.presses.pyramidkv import pyramidkv
from tokcomp_jax.presses.qfilter import calibrate_qfilters, qfilter
from tokcomp_jax.presses.random_press import random
from tokcomp_jax.presses.registry import PRESS_NAMES, PRESSES, make_press
from tokcomp_jax.presses.snapkv import snapkv
from tokcomp_jax.presses.streaming_llm import streaming_llm
from tokcomp_jax.presses.tova import tova

__all__ = ["PRESSES", "PRESS_NAMES", "make_press", "Press", "Scorer", "Observation", "Budget", "keep_top",
           "scorer_press", "chain", "per_layer", "adakv", "chunkwise", "knorm", "snapkv", "streaming_llm",
           "observed_attention", "h2o", "tova", "keydiff", "random", "expected_attention", "pyramidkv", "a2sf",
           "lacache", "qfilter", "calibrate_qfilters"]
