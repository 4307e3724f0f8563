"""Orbax checkpoints of the train state and the grain iterator, with safe resume.

Layout: ``<workdir>/checkpoints/<step>/{state, data}``. ``state`` is the train state pytree
(sharded arrays, written by every process for its own shards); ``data`` holds one JSON file
per process with its grain iterator position (grain's own Orbax handler). Saves are
asynchronous; Orbax writes into a temporary directory and renames it when complete, so a
crash mid-save never leaves a half-written step behind. A finished step that fails to
restore (a truncated or damaged file) is moved aside to ``<workdir>/checkpoints_corrupt/``
with a warning and the previous step is used; moving it aside matters because Orbax refuses
to save a step at or below its latest one, so the rerun would otherwise never replace it.

The workdir may be local or a ``gs://`` URL (Orbax writes through TensorStore; on Cloud Storage
a step counts as finished once Orbax's commit marker is there, instead of the rename).
"""

from __future__ import annotations

import os
from typing import Any

import grain.checkpoint as grain_checkpoint
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from tread_jax import paths

STATE = "state"
DATA = "data"


def checkpoint_dir(workdir: str) -> str:
    """Where a training workdir keeps its checkpoints."""
    return os.path.join(paths.absolute(workdir), "checkpoints")


def saved_steps(workdir: str) -> list[int]:
    """The finished checkpoint steps of a training workdir, ascending (Orbax's own test: its
    temporary directories, and on Cloud Storage the steps without a commit marker, are left out)."""
    return sorted(ocp.utils.checkpoint_steps(checkpoint_dir(workdir)))


def restore_ema_params(workdir: str, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
    """The EMA parameters of checkpoint ``step`` (default: the latest) of a training workdir.

    Reads only ``ema_params`` from the saved train state (a partial Orbax restore: sampling and
    evaluation need neither the raw parameters nor the optimizer state, which triple the
    memory), into the shapes and shardings of ``abstract_params`` (ShapeDtypeStructs).
    """
    directory = checkpoint_dir(workdir)
    steps = saved_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {directory}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} in {directory}; saved steps: {steps}")
    item = {"ema_params": abstract_params}
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(os.path.join(directory, str(step), STATE), args=args)
    return restored["ema_params"], step


def _iterator_file(step_dir: str) -> str:
    """The file in which grain's handler keeps this process's iterator state."""
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return os.path.join(step_dir, DATA, name)


class Checkpointer:
    """Saves every ``save_interval_steps`` steps, keeps ``max_to_keep``, resumes the latest good.

    ``read_only``: for another run's checkpoints (``init_from``): nothing is saved, deleted or
    moved there; an unreadable step is only skipped.
    """

    def __init__(self, workdir: str, *, save_interval_steps: int = 1, max_to_keep: int = 1,
                 read_only: bool = False):
        self.directory = checkpoint_dir(workdir)
        self.corrupt_directory = os.path.join(paths.absolute(workdir), "checkpoints_corrupt")
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            max_to_keep=max_to_keep,
            enable_async_checkpointing=not read_only,
            create=not read_only,
            read_only=read_only,
            # A save cut short (a kill) leaves an unfinished step: a temporary folder locally, a
            # step folder without its commit marker on Cloud Storage, where a later save of the
            # same step would otherwise write into the leftovers.
            cleanup_tmp_directories=not read_only,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(STATE, DATA)
        )

    def reached_preemption(self, step: int) -> bool:
        """True on every process once all agreed to stop here after a preemption notice.

        Works only when jax.distributed runs its preemption service (multi-process jobs).
        """
        return jax.process_count() > 1 and self.manager.reached_preemption(step)

    def save(self, step: int, state: Any, data_iterator: Any) -> None:
        """Starts an asynchronous save of ``state`` and the iterator position at ``step``.

        ``data_iterator``: anything with grain's ``get_state()``, e.g. the position the loop
        recorded for ``step`` (``prefetch.InputPosition``) when it reads ahead.

        The caller must have checked that ``state`` is finite: a saved step is trusted on resume.
        """
        args = ocp.args.Composite(
            **{
                STATE: ocp.args.StandardSave(state),
                DATA: grain_checkpoint.CheckpointSave(data_iterator),
            }
        )
        self.manager.save(step, args=args, force=True)

    def restore_latest(self, abstract_state: Any, data_iterator: Any = None) -> tuple[Any, int] | None:
        """Restores the newest readable step into ``abstract_state``'s shapes and shardings.

        Returns ``(state, step)`` or None when there is no usable checkpoint. A given iterator
        is restored in place (None: state only, e.g. for sampling); if the checkpoint came from
        a different number of processes its position cannot be mapped and the input stream
        starts over (with a warning).
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            step_dir = os.path.join(self.directory, str(step))
            items = {STATE: ocp.args.StandardRestore(abstract_state)}
            same_layout = data_iterator is None or epath.Path(_iterator_file(step_dir)).exists()
            if data_iterator is not None and same_layout:
                items[DATA] = grain_checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as error:  # noqa: BLE001 - any read failure means "unusable step"
                logging.warning(
                    "checkpoint step %d in %s cannot be restored (%s: %s); %s, trying the "
                    "previous one",
                    step, self.directory, type(error).__name__, str(error).splitlines()[0][:300],
                    "left in place (read-only)" if self.read_only else f"moved to {self.corrupt_directory}",
                )
                if not self.read_only:
                    self._quarantine(step)
                continue
            if not same_layout:
                logging.warning(
                    "checkpoint step %d was written by a different number of processes; the "
                    "data iterator restarts from the beginning of its stream", step,
                )
            return restored[STATE], step
        return None

    def _quarantine(self, step: int) -> None:
        """Moves an unreadable step out of the managed directory (process 0), then re-lists."""
        if jax.process_index() == 0:
            paths.move_tree(os.path.join(self.directory, str(step)), os.path.join(self.corrupt_directory, str(step)))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"tread_jax_quarantine_{step}")
        self.manager.reload()

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
