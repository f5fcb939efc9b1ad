"""The optimizer: AdamW on a warmup + cosine schedule, global-norm clipping, and a weight-decay mask.

>>> from tokcomp_jax.training.config import base_config
>>> optim = base_config().optim
>>> optim.update(lr=1.0, warmup_steps=2, end_lr_ratio=0.1)
>>> schedule = learning_rate_schedule(optim, steps=4)
>>> [round(float(schedule(count)), 3) for count in range(4)]  # the lr of updates 1 to 4
[0.5, 1.0, 0.55, 0.1]
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import ml_collections
import optax


def learning_rate_schedule(optim: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
    """lr(count) of update count + 1: linear warmup over `warmup_steps` updates to `lr`, then cosine
    decay that reaches `lr * end_lr_ratio` at update `steps`."""
    base = optax.warmup_cosine_decay_schedule(0.0, optim.lr, optim.warmup_steps, steps, optim.lr * optim.end_lr_ratio)
    return lambda count: base(count + 1)


def _suffix_match(path: tuple[str, ...], suffixes: Sequence[str]) -> bool:
    return any(path[-len(parts):] == parts for parts in (tuple(s.split("/")) for s in suffixes))


def decay_mask(params, no_decay: Sequence[str] = ()):
    """True for the parameters weight decay applies to: matrices, except those whose "/"-joined
    path ends with one of `no_decay` (new-token embeddings); never vectors (norms, biases)."""
    def decays(path, x) -> bool:
        keys = tuple(str(getattr(e, "key", getattr(e, "idx", e))) for e in path)
        return x.ndim >= 2 and not _suffix_match(keys, no_decay)
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: ml_collections.ConfigDict, steps: int,
                   no_decay: Sequence[str] = ()) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with `learning_rate_schedule`, after clipping the gradients' global norm to
    `optim.clip_norm` (0: no clipping); and the schedule."""
    schedule = learning_rate_schedule(optim, steps)
    adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                        mask=lambda params: decay_mask(params, no_decay))
    if optim.clip_norm:
        return optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw), schedule
    return adamw, schedule
