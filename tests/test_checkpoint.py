"""Checkpoints: exact resume after SIGKILL, SIGTERM saves and exits 0, corrupted latest step
skipped, non-finite loss stops without saving the bad state.

Every run is the real entry point (``python -m tread_jax.main``) or ``train_and_evaluate`` on a
tiny DiT over the real digits.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import jax
import trainer_testlib as tl
from tread_jax import train

STEPS = 60
EVERY = 10
tl.enable_compilation_cache()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def config(data_dir):
    return tl.tiny_config(data_dir, num_train_steps=STEPS, checkpoint_every=EVERY, max_to_keep=10)


@pytest.fixture(scope="module")
def config_file(config, tmp_path_factory) -> Path:
    return tl.write_config(config, tmp_path_factory.mktemp("config") / "tiny.py")


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory) -> str:
    """An uninterrupted run, in a subprocess like the interrupted ones (same device layout)."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    config_file = tl.write_config(config, Path(workdir) / "config.py")
    done = tl.run_main(config_file, workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def _run_until(config_file: Path, workdir: str, ready, sig: int) -> subprocess.Popen:
    """Starts the entry point and sends ``sig`` once ``ready()`` holds; returns the ended process."""
    proc = subprocess.Popen(
        tl.main_command(config_file, workdir), cwd=tl.REPO, env=tl.subprocess_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 240
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be interrupted:\n" + proc.stdout.read()[-3000:]
    proc.send_signal(sig)
    proc.output = proc.communicate(timeout=240)[0]
    return proc


def _assert_same_state(workdir: str, reference: str, step: int) -> None:
    got, want = tl.load_state(workdir, step), tl.load_state(reference, step)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_sigkill_between_checkpoints_resumes_bit_identically(config_file, reference, tmp_path):
    workdir = str(tmp_path)
    # Kill once a checkpoint is on disk and the run has moved past it.
    killed = _run_until(
        config_file, workdir,
        lambda: tl.saved_steps(workdir) and max(tl.logged(workdir), default=0) > EVERY + 1,
        signal.SIGKILL,
    )
    assert killed.returncode == -signal.SIGKILL
    # Steps past the last finished checkpoint were lost (an asynchronous save may even have
    # been cut short): the restart must redo them from that checkpoint.
    last_saved = max(tl.saved_steps(workdir))
    assert max(tl.logged(workdir)) > last_saved, killed.output[-2000:]

    resumed = tl.run_main(config_file, workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from checkpoint step {last_saved}" in resumed.stdout
    _assert_same_state(workdir, reference, STEPS)
    # The replayed steps saw the same data and randomness: identical losses.
    assert tl.logged(workdir) == tl.logged(reference)


def test_sigterm_saves_current_step_and_restart_continues(config_file, reference, tmp_path):
    workdir = str(tmp_path)
    stopped = _run_until(
        config_file, workdir, lambda: max(tl.logged(workdir), default=0) > EVERY + 2, signal.SIGTERM
    )
    assert stopped.returncode == 0, stopped.output[-3000:]
    stop_step = max(tl.logged(workdir))
    assert stop_step in tl.saved_steps(workdir)
    assert f"saved step {stop_step}, exiting" in stopped.output

    resumed = tl.run_main(config_file, workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from checkpoint step {stop_step}" in resumed.stdout
    _assert_same_state(workdir, reference, STEPS)


def _damage_latest_step(workdir: Path) -> None:
    """Truncates the largest array file of the newest step: a damaged but "finished" checkpoint."""
    latest = workdir / "checkpoints" / str(STEPS)
    victim = max((p for p in (latest / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)


# Orbax's failed read of the damaged step leaves asyncio callbacks behind that fire after their
# loop closed; they are noise from the expected failure, not a fault of the run.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupted_latest_checkpoint_is_skipped(config, reference, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    (workdir / "metrics.jsonl").unlink()
    _damage_latest_step(workdir)

    with caplog.at_level("WARNING"):
        result = train.train_and_evaluate(config, str(workdir))
    assert any(f"checkpoint step {STEPS}" in r.getMessage() and "cannot be restored" in r.getMessage()
               for r in caplog.records)
    assert (workdir / "checkpoints_corrupt" / str(STEPS)).is_dir()
    # Resumed from the previous step and replaced the bad step with a good one.
    assert min(tl.logged(str(workdir))) == STEPS - EVERY + 1
    assert result["step"] == STEPS
    _assert_same_state(str(workdir), reference, STEPS)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_init_from_skips_a_damaged_step_and_leaves_the_source_run_as_it_was(
        data_dir, reference, tmp_path, caplog):
    source = tmp_path / "source"
    shutil.copytree(reference, source)
    _damage_latest_step(source)
    files_before = {p: p.stat().st_size for p in source.rglob("*")}
    config = tl.tiny_config(data_dir, init_from=str(source), num_train_steps=STEPS - EVERY + 2)

    with caplog.at_level("WARNING"):
        train.train_and_evaluate(config, str(tmp_path / "finetune"))
    assert any(f"checkpoint step {STEPS}" in r.getMessage() and "left in place" in r.getMessage()
               for r in caplog.records)
    assert min(tl.logged(str(tmp_path / "finetune"))) == STEPS - EVERY + 1  # the previous good step
    assert {p: p.stat().st_size for p in source.rglob("*")} == files_before  # nothing moved or written


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    # A learning rate near float32's limit turns the parameters to ~1e38 after one update, so
    # the second step's loss overflows.
    config = tl.tiny_config(data_dir, checkpoint_every=1, **{"optim.learning_rate": 1e38, "optim.warmup_steps": 0})
    with pytest.raises(FloatingPointError, match=r"non-finite loss, gradient or state at step 2; .*last good checkpoint is step 1"):
        train.train_and_evaluate(config, str(tmp_path))
    assert tl.saved_steps(str(tmp_path)) == [1]
