"""The binaries' re-execution under glibc settings that keep XLA:CPU's step buffers mapped."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

import trainer_testlib as tl
from tread_jax import host_allocator

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

# Prints its line, re-executes, prints the settings it ends with: the line appears once per run.
_REEXEC = """
import json, os
from tread_jax import host_allocator
print("started", flush=True)
host_allocator.reexec_with_reusable_heap()
print(json.dumps({name: os.environ.get(name) for name in host_allocator.SETTINGS}))
"""

# A jitted program whose temporary buffer holds 64 MB (a scan's stacked outputs), as a train
# step's does; prints the median minor page faults per call once it is compiled (the heap
# still grows into fresh pages on an occasional call).
_FAULTS = """
import resource, statistics
import jax, jax.numpy as jnp
from tread_jax import host_allocator
host_allocator.reexec_with_reusable_heap()

@jax.jit
def program(x):
    _, ys = jax.lax.scan(lambda c, _: (c * 1.0001 + 1.0, c), x, None, length=64)
    return (ys * ys).sum(0) + ys.max(0)

x = jnp.ones((1024, 256))
jax.block_until_ready(program(x))
faults = []
for _ in range(15):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(program(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults))
"""


def _run(script: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in host_allocator.SETTINGS and k != "JAX_PLATFORMS"}
    environ.update(env, PYTHONPATH=str(tl.REPO), JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"))
    done = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_reexecutes_once_with_the_settings():
    lines = _run(_REEXEC).splitlines()
    assert lines[:2] == ["started", "started"] and len(lines) == 3
    assert json.loads(lines[2]) == host_allocator.SETTINGS


@pytest.mark.parametrize("env", [{"MALLOC_ARENA_MAX": "2"}, {"JAX_PLATFORMS": "cuda"}, {"JAX_PLATFORMS": "tpu,cpu"}])
def test_leaves_a_users_allocator_and_accelerator_hosts_alone(env):
    lines = _run(_REEXEC, **env).splitlines()
    assert lines[0] == "started" and len(lines) == 2
    assert json.loads(lines[1]) == {name: env.get(name) for name in host_allocator.SETTINGS}


def test_a_step_sized_temporary_buffer_is_reused_instead_of_faulted_in_again():
    pages = 64 * 2**20 // 4096
    faults_per_call = float(_run(_FAULTS))
    # Without the settings every call faults its buffers in again (about 50K faults here).
    assert faults_per_call < pages / 4, f"median {faults_per_call:.0f} page faults per call, buffer {pages} pages"
