"""Shared pieces for the trainer tests: a tiny config and ways to run the real entry point.

The tiny config is the digits default shrunk to a 2-block, width-32 DiT so a step costs
milliseconds on CPU; every test changes only what it is about.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import ml_collections
import numpy as np
from etils import epath

from tread_jax import cli

REPO = Path(__file__).resolve().parents[1]
DIGITS_CONFIG = REPO / "configs" / "digits.py"
COMPILATION_CACHE = Path(tempfile.gettempdir()) / f"tread_jax_test_compilation_cache_{os.getuid()}"


def load_config(path: Path = DIGITS_CONFIG, variant: str | None = None) -> ml_collections.ConfigDict:
    """A config file's config, as ``--config=path[:variant]`` would load it."""
    module = cli.load_config_module(path)
    return module.get_config(variant) if variant else module.get_config()


def enable_compilation_cache() -> None:
    """Lets this (pytest) process share compiled programs with the subprocess runs."""
    import jax  # pylint: disable=g-import-not-at-top

    jax.config.update("jax_compilation_cache_dir", str(COMPILATION_CACHE))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def tiny_config(data_dir: str, **changes) -> ml_collections.ConfigDict:
    """The digits config with a tiny model and short schedule; ``changes`` use dotted keys."""
    config = load_config()
    config.model.overrides = dict(depth=2, hidden_size=32, num_heads=2)
    config.routes = [dict(start=0, end=0, ratio=0.5)]
    config.data.data_dir = data_dir
    config.data.num_threads = 1
    config.global_batch_size = 16
    config.num_train_steps = 8
    config.optim.warmup_steps = 2
    config.optim.decay_steps = 0  # a constant rate after the warmup, whatever the digits run uses
    config.log_every = 1
    config.checkpoint_every = 4
    config.fsdp_min_size = 256  # small enough that the tiny model's kernels get sharded
    config.sample.every = 0
    config.eval.report = ""
    for key, value in changes.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


def write_config(config: ml_collections.ConfigDict, path: Path) -> Path:
    """A config file for ``--config`` that rebuilds ``config`` (via its JSON form)."""
    path = Path(path)
    path.write_text(
        "import json\nimport ml_collections\n\n\ndef get_config():\n"
        f"    return ml_collections.ConfigDict(json.loads({config.to_json()!r}))\n"
    )
    return path


def main_command(config_file: Path, workdir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tread_jax.main", f"--config={config_file}", f"--workdir={workdir}", *extra]


def subprocess_env(num_devices: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    if num_devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    # The runs of one test compile the same programs; a shared persistent cache compiles once.
    env["JAX_COMPILATION_CACHE_DIR"] = str(COMPILATION_CACHE)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def run_main(config_file, workdir, *extra, num_devices=None, timeout=240) -> subprocess.CompletedProcess:
    """Runs ``python -m tread_jax.main`` to completion; returns the finished process."""
    return subprocess.run(
        main_command(config_file, workdir, *extra), cwd=REPO, env=subprocess_env(num_devices),
        capture_output=True, text=True, timeout=timeout,
    )


def logged(workdir: str, key: str = "loss") -> dict[int, float]:
    """``{step: value}`` from a run's metrics.jsonl (later lines win, as after a resume); the
    workdir may be a ``gs://`` URL, as may those of the two functions below."""
    out = {}
    path = epath.Path(workdir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                out[record["step"]] = record[key]
    return out


def saved_steps(workdir: str) -> list[int]:
    directory = epath.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def load_state(workdir: str, step: int) -> dict:
    """The saved train state of ``step`` as nested dicts of numpy arrays, on one device.

    Restoring with explicit one-device targets works whatever mesh the checkpoint came from.
    """
    import jax  # pylint: disable=g-import-not-at-top
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    path = epath.Path(workdir) / "checkpoints" / str(step) / "state"
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path).item_metadata
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
        restored = checkpointer.restore(path, target)
    return jax.tree.map(np.asarray, restored)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
