"""A ``jax.profiler`` trace of a few training steps, after the warm-up, into ``<workdir>/profile``.

The trace (``plugins/profile/<run>/*.xplane.pb`` for TensorBoard's profile plugin, and
``perfetto_trace.json.gz`` for https://ui.perfetto.dev) starts a few calls after the loop's
first, so that neither compilation nor the first dispatches are in it. jax's profiler writes to
the local file system: for a ``gs://`` workdir the trace goes to a local folder first and is
uploaded when it ends.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import jax

from tread_jax import paths, runtime

# Calls of the train step before the trace starts: the first runs a freshly loaded executable.
WARMUP_CALLS = 2


class StepProfiler:
    """Traces steps ``start_step + WARMUP_CALLS * steps_per_call`` onwards for ``num_steps``
    steps (0 = never). The loop calls ``before`` and ``after`` around each call of the step."""

    def __init__(self, workdir: str, *, num_steps: int, start_step: int, steps_per_call: int):
        self.directory = os.path.join(workdir, "profile")
        self._trace_directory = self.directory
        if num_steps and paths.is_remote(workdir):
            self._trace_directory = tempfile.mkdtemp(prefix="tread_jax_profile_")
        self._first = start_step + WARMUP_CALLS * steps_per_call if num_steps else None
        self._end = (self._first or 0) + num_steps
        self._tracing = False

    def before(self, step: int) -> None:
        """``step``: the steps done before this call."""
        if step == self._first:
            jax.profiler.start_trace(self._trace_directory, create_perfetto_trace=True)
            self._tracing = True

    def after(self, done: int, state: Any) -> None:
        """``done``: the steps done after this call; ``state`` its result (waited for, so that
        the trace holds the step's execution and not only its dispatch)."""
        if self._tracing and done >= self._end:
            jax.block_until_ready(state)
            self.stop()
            runtime.say(f"profiled steps {self._first + 1}..{done} into {self.directory}")

    def stop(self) -> None:
        """Ends a trace in progress (the run stopped inside the traced steps)."""
        if self._tracing:
            jax.profiler.stop_trace()
            self._tracing = False
            if self._trace_directory != self.directory:
                paths.upload_tree(self._trace_directory, self.directory)
