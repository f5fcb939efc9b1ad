"""Checkpoints of a run's training state, named by step, with Orbax.

A checkpoint holds the trained parameters and the optimizer state; its step (updates done) is the
state of the input pipeline, whose batches are a pure function of the step. Orbax writes each one
to a temporary directory and renames it when complete, so a run killed while saving leaves only
finished checkpoints to resume from (and the unfinished one's temporary directory, which the next
run deletes). A finished checkpoint damaged later (a truncated file) is set aside by `restore_latest`,
which resumes from the newest one that restores.
"""
from __future__ import annotations

import logging
import os
import shutil

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No checkpoint of a run restores."""


class Checkpoints:
    """The checkpoints in `directory`: the newest `max_to_keep` are kept; `async_save` writes them in
    the background while training goes on (the arrays are copied off the devices first)."""

    def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def latest_step(self) -> int | None:
        """The step of the newest finished checkpoint, None if there is none."""
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore(self, step: int, abstract_state):
        """The state saved at `step`, placed like `abstract_state` (`jax.ShapeDtypeStruct`s with
        shardings), whatever the mesh it was saved from."""
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def restore_latest(self, abstract_state, damaged_directory: str):
        """`(step, state)` of the newest checkpoint that restores, `(0, None)` if there is none.

        Newer checkpoints that fail to restore (truncated or missing files, unreadable metadata) are
        reported and moved into `damaged_directory`, never deleted; if none restores, raises
        `CheckpointError` naming each one tried with its reason, and moves nothing."""
        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 (TensorStore and JSON errors are plain Exceptions)
                failures.append((step, _reason(e)))
                continue
            self._set_aside(failures, damaged_directory, step)
            return step, state
        if failures:
            tried = "; ".join(f"step {step}: {reason}" for step, reason in failures)
            raise CheckpointError(f"no checkpoint in {self.manager.directory} restores ({tried}). Move the damaged "
                                  f"ones out of the directory to start the run afresh.")
        return 0, None

    def _set_aside(self, failures: list[tuple[int, str]], damaged_directory: str, resumed: int) -> None:
        """Moves the checkpoints of `failures` into `damaged_directory` (process 0; the others wait)."""
        if not failures:
            return
        if jax.process_index() == 0:
            os.makedirs(damaged_directory, exist_ok=True)
            for step, reason in failures:
                target = os.path.join(damaged_directory, str(step))
                suffix = 1
                while os.path.exists(target):
                    target, suffix = os.path.join(damaged_directory, f"{step}.{suffix}"), suffix + 1
                shutil.move(os.path.join(os.fspath(self.manager.directory), str(step)), target)
                log.warning("checkpoint %d does not restore (%s); moved to %s, resuming from step %d.",
                            step, reason, target, resumed)
        multihost_utils.sync_global_devices("tokcomp_jax: damaged checkpoints set aside")
        self.manager.reload()

    def close(self) -> None:
        """Waits for the saves under way to finish."""
        self.manager.wait_until_finished()
        self.manager.close()


def restore_trained(directory: str, abstract_trained):
    """The trained parameters (the state's "trained", without the optimizer state) of the newest
    finished checkpoint in `directory`, placed like `abstract_trained`; raises `FileNotFoundError`
    if there is none and `ValueError` if its parameters' names or shapes differ."""
    steps = [int(name) for name in os.listdir(directory) if name.isdigit()] if os.path.isdir(directory) else []
    if not steps:
        raise FileNotFoundError(f"{directory} holds no finished checkpoint.")
    path = os.path.join(os.path.abspath(directory), str(max(steps)), "default")
    checkpointer = ocp.PyTreeCheckpointer()
    saved, wanted = (_shapes(tree) for tree in (checkpointer.metadata(path).item_metadata.tree["trained"],
                                                abstract_trained))
    if saved != wanted:
        differ = sorted(name for name in saved.keys() | wanted.keys() if saved.get(name) != wanted.get(name))
        raise ValueError(f"the checkpoint at step {max(steps)} in {directory} holds other trained parameters than "
                         f"this run's: {', '.join(differ[:5])}{', ...' if len(differ) > 5 else ''} differ.")
    item = {"trained": abstract_trained}
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    return checkpointer.restore(path, args=args)["trained"]


def _reason(error: Exception) -> str:
    """The first line of `error`'s message, at most 200 characters, after its type."""
    message = str(error).strip().split("\n")[0].split(" See full TensorStore details")[0]
    return f"{type(error).__name__}: {message[:200]}"


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """Each leaf's shape by its "/"-joined path (a checkpoint's metadata names list indices as strings)."""
    return {"/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def abstract_like(tree, shardings):
    """`jax.ShapeDtypeStruct`s of `tree`'s arrays with `shardings`, a restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
