"""glibc malloc settings that keep XLA:CPU's per-step buffers mapped from one step to the next.

XLA:CPU allocates the temporary buffer of every execution (all of a train step's intermediates
in one block: 351 MB for the digits SSM's step) with malloc,
on one of its worker threads, and frees it when the step ends. glibc serves a request that large
from a fresh ``mmap`` (it is above the mmap threshold, and too large for a thread's arena) and
unmaps it on free, so on every step the kernel maps and zero-fills each page again. Measured on
the 2-core CPU (benchmarks/README.md, "Host allocator"): 86K page faults and 130 ms of system
time per digits SSM step, 15K and 25 ms per DiT step.

One arena for all threads and mmap/trim thresholds above any step's size keep those buffers in
the heap, where the next step reuses them: ``MALLOC_ARENA_MAX=1``, ``MALLOC_MMAP_THRESHOLD_``
and ``MALLOC_TRIM_THRESHOLD_`` (mallopt(3)). glibc reads them only when a process starts (and
``mallopt`` cannot raise the mmap threshold above 32 MB), so the binaries re-execute themselves
once with them set: :func:`reexec_with_reusable_heap`. It does so only where jax will compute
on the CPU (no GPU or TPU plugin installed, or ``JAX_PLATFORMS=cpu``) and only if none of the
three is already set, so setting any of them yourself keeps your allocator as it is.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
import sys

# 4 GiB: above any CPU step's temporary buffer, so glibc neither maps it apart nor returns it.
_THRESHOLD = str(4 << 30)
SETTINGS = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": _THRESHOLD, "MALLOC_TRIM_THRESHOLD_": _THRESHOLD}


def _accelerator_plugin_installed() -> bool:
    """Whether jax could find a GPU or TPU backend here, found without initialising any."""
    if importlib.util.find_spec("libtpu") is not None or importlib.metadata.entry_points(group="jax_plugins"):
        return True
    try:
        import jax_plugins  # the namespace package of jax's CUDA and ROCm plugins
    except ImportError:
        return False
    return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def computes_on_cpu() -> bool:
    """Whether this process's jax will run on the CPU backend (decided before jax starts one)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not _accelerator_plugin_installed()


def reexec_with_reusable_heap() -> None:
    """Replaces this process with the same command line under :data:`SETTINGS`, once, when it runs
    on glibc and computes on the CPU and none of the settings is set; otherwise returns.

    Call it from a binary's ``if __name__ == "__main__"`` block, before any work: the process is
    replaced (same pid, arguments and environment otherwise).
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return
    if any(name in os.environ for name in SETTINGS) or not computes_on_cpu():
        return
    os.environ.update(SETTINGS)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
