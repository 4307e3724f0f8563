"""Helpers for programs that run as one process or as many (multi-host pods, multi-process CPU).

The persistent compilation cache, compiling with a barrier, copying replicated arrays to the
host, console output on process 0, and turning SIGTERM into a flag that a loop polls.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental.compilation_cache import compilation_cache

from tread_jax import paths

_COMPILE_BARRIER_S = 3600
# Programs that compile faster than this are not cached: reading an entry costs about as much.
_CACHE_MIN_COMPILE_S = 0.2


def enable_compilation_cache(directory: str, workdir: str) -> None:
    """Turns on jax's persistent compilation cache in ``directory`` (relative to ``workdir``,
    or a ``gs://`` URL; "" = off) unless this process already has one
    (``JAX_COMPILATION_CACHE_DIR``, or an earlier run in the same process, wins).

    A job that restarts after a preemption then loads its compiled programs instead of
    compiling them again.
    """
    if jax.config.jax_compilation_cache_dir or not directory:
        return
    if not paths.is_remote(directory):
        directory = os.path.join(paths.absolute(workdir), directory)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", _CACHE_MIN_COMPILE_S)
    # jax decides once per process whether to use a cache, at its first compilation (an eager
    # operation counts): make it decide again with the directory set.
    compilation_cache.reset_cache()


def to_host(x: jax.Array) -> np.ndarray:
    """A replicated array as numpy on this process (works when other processes hold copies too)."""
    return np.asarray(x.addressable_data(0))


def say(message: str) -> None:
    """Console output for the person running the job: process 0 only."""
    if jax.process_index() == 0:
        print(message, flush=True)


def compile_everywhere(jitted: Any, *args: Any, name: str) -> Any:
    """Compiles ``jitted`` for ``args`` ahead of time, then waits for every process to finish.

    Multi-process CPU runs exchange data through gloo, whose connection setup gives up after
    30 s; without this barrier a process that compiles faster would wait in the program's
    first collective for one that is still compiling and fail. The barrier goes through the
    coordination service instead, which has no such limit. Its ``name`` must be unique within
    the job (Orbax: a barrier name must not be reused): callers name the program
    and whatever makes this compilation of it distinct (a shape, a setting).
    """
    compiled = jitted.lower(*args).compile()
    if jax.process_count() > 1:
        barrier = "tread_jax_compiled_" + re.sub(r"\W+", "_", name)
        ocp.multihost.sync_global_processes(barrier, timeout=_COMPILE_BARRIER_S)
    return compiled


class StopSignal:
    """Turns SIGTERM into a flag (``requested``) that a loop polls, so it can save and exit cleanly.

    Only for single-process jobs: in a multi-process job jax's preemption service owns SIGTERM
    and the loop asks the checkpoint manager instead, so that all processes stop at one step.
    ``install()`` reuses a StopSignal that is already installed (an entry point may install it
    before its own start-up work, the trainer again), so a SIGTERM at any time is seen once.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    @classmethod
    def install(cls) -> StopSignal:
        current = signal.getsignal(signal.SIGTERM)
        owner = getattr(current, "__self__", None)
        if isinstance(owner, cls):
            return owner
        stop = cls()
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            stop._previous = signal.signal(signal.SIGTERM, stop._handle)
            stop._installed = True
        return stop

    def _handle(self, signum: int, frame: Any) -> None:
        del signum, frame
        self.requested = True

    def restore(self) -> None:
        """Puts back the handler that was there before ``install`` (only by the installer)."""
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False
