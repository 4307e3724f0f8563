"""``gs://`` workdirs against a real Cloud Storage API server on 127.0.0.1 (``gcs_bucket`` in
conftest.py): a run killed with SIGKILL, whose newest checkpoint in the bucket is then damaged,
moves that step aside as it does locally and resumes from the one before to the state of an
uninterrupted local run; a fine-tune starts from the run in the bucket as from the local run; the
evaluation binary reads the run from the bucket; reference statistics, jax's persistent compilation
cache and two processes' checkpoint are written there; and preflight reports a missing bucket or
bad credentials in one line.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import fsspec
import numpy as np
import pytest
from etils import epath
from tensorboard.backend.event_processing import event_accumulator

import cli_testlib
import trainer_testlib as tl
from tread_jax import checkpoint, train
from tread_jax.metrics import fid, reference_stats

STEPS = 48
EVERY = 8
TWO_PROCESS_STEPS = 8
tl.enable_compilation_cache()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def config(data_dir):
    return tl.tiny_config(data_dir, num_train_steps=STEPS, checkpoint_every=EVERY, max_to_keep=10, profile_steps=2)


@pytest.fixture(scope="module")
def config_file(config, tmp_path_factory) -> Path:
    return tl.write_config(config, tmp_path_factory.mktemp("config") / "tiny.py")


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory) -> str:
    """An uninterrupted run in a local workdir, in a subprocess like the bucket runs."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    done = tl.run_main(config_file, workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


@dataclasses.dataclass
class BucketRun:
    workdir: str
    damaged_step: int  # the newest finished step when the run was killed, damaged afterwards
    resumed: subprocess.CompletedProcess


def _kill_past_the_second_checkpoint(config_file: Path, workdir: str) -> int | None:
    """Runs main in ``workdir`` and kills it with SIGKILL once it has logged steps past its second
    or later checkpoint; returns the newest finished step, or None where the kill came too late
    (on a loaded machine the run can finish while the bucket is being read)."""
    proc = subprocess.Popen(tl.main_command(config_file, workdir), cwd=tl.REPO, env=tl.subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        logged = max(tl.logged(workdir), default=0)  # before the steps: the test errs towards waiting
        saved = checkpoint.saved_steps(workdir)
        if len(saved) >= 2 and logged > max(saved) + 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stdout.read()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    newest = max(checkpoint.saved_steps(workdir))
    return newest if newest < STEPS and max(tl.logged(workdir)) > newest else None


@pytest.fixture(scope="module")
def bucket_run(gcs_bucket, config_file, reference) -> BucketRun:
    """A run in the bucket killed with SIGKILL past its second checkpoint; the newest finished
    step is then damaged (its largest array file truncated) and the run resumed to the end."""
    for attempt in range(3):
        workdir = f"{gcs_bucket}/resumed{attempt}"
        damaged_step = _kill_past_the_second_checkpoint(config_file, workdir)
        if damaged_step is not None:
            break
    assert damaged_step is not None, "three runs finished their last checkpoint before the kill"
    bucket, path = fsspec.core.url_to_fs(f"{workdir}/checkpoints/{damaged_step}/state")
    victim, info = max(bucket.find(path, detail=True).items(), key=lambda item: item[1]["size"])
    bucket.pipe(victim, bucket.cat(victim)[: info["size"] // 2])

    resumed = tl.run_main(config_file, workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return BucketRun(workdir, damaged_step, resumed)


def _assert_same_state(workdir: str, reference: str, step: int) -> None:
    jax.tree.map(np.testing.assert_array_equal, tl.load_state(workdir, step), tl.load_state(reference, step))


def test_sigkill_in_the_bucket_resumes_bit_identically_to_a_local_run(bucket_run, reference, tmp_path):
    workdir = bucket_run.workdir
    assert not Path("gs:").exists()  # nothing went to a local folder named after the URL
    _assert_same_state(workdir, reference, STEPS)
    assert tl.logged(workdir) == tl.logged(reference)  # metrics.jsonl, truncated and rewritten
    root = epath.Path(workdir)
    recorded = json.loads((root / "dataset.json").read_text())
    assert recorded == json.loads((Path(reference) / "dataset.json").read_text())
    assert (root / "parameter_overview.txt").read_text() == (Path(reference) / "parameter_overview.txt").read_text()
    traces = [t.stat().length for t in (root / "profile" / "plugins" / "profile").glob("*/*.xplane.pb")]
    assert traces and all(traces), traces  # traced locally, uploaded when the trace ended
    # TensorBoard's reader on a copy: the resumed run's scalars (the killed run's event file, not
    # flushed yet when it was killed, never reached the bucket).
    for event_file in (root / "tensorboard").iterdir():
        event_file.copy(tmp_path / event_file.name)
    reader = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={event_accumulator.SCALARS: 0})
    reader.Reload()
    losses = {event.step: event.value for event in reader.Scalars("loss")}
    assert max(losses) == STEPS and len(losses) >= EVERY
    reference_losses = tl.logged(reference)
    np.testing.assert_allclose([losses[s] for s in losses], [reference_losses[s] for s in losses], rtol=1e-6)


def test_a_damaged_latest_step_in_the_bucket_is_moved_aside(bucket_run):
    workdir, step = bucket_run.workdir, bucket_run.damaged_step
    assert f"checkpoint step {step} in {workdir}/checkpoints cannot be restored" in bucket_run.resumed.stderr
    assert (epath.Path(workdir) / "checkpoints_corrupt" / str(step) / "state").exists()
    assert f"resumed from checkpoint step {step - EVERY}" in bucket_run.resumed.stdout
    # Replaced by a good step (the state of the uninterrupted run: the test above).
    assert step in checkpoint.saved_steps(workdir)


def test_the_evaluation_binary_reads_the_run_from_the_bucket(bucket_run, config_file):
    workdir = bucket_run.workdir
    done = subprocess.run(
        [sys.executable, "-m", "tread_jax.evaluate", f"--config={config_file}", f"--workdir={workdir}",
         "--num_samples=20", "--num_steps=2", "--per_device_batch=10", "--save_npz"],
        cwd=tl.REPO, env=tl.subprocess_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout[done.stdout.index("{"):])
    assert result["step"] == STEPS and result["complete"] and result["extractor"] == "digits"
    assert result["metrics_json"] == f"{workdir}/eval/{STEPS}/n20_steps2_cfg1_seed0/metrics.json"
    assert json.loads(epath.Path(result["metrics_json"]).read_text())["accuracy"] == result["accuracy"]
    assert epath.Path(result["metrics_json"]).with_name("progress.npz").exists()
    # The samples' memory map lives on this machine; the finished ADM npz is uploaded.
    assert result["samples_npz"] == f"{workdir}/eval/{STEPS}/n20_steps2_cfg1_seed0/samples.npz"
    with np.load(io.BytesIO(epath.Path(result["samples_npz"]).read_bytes())) as samples:
        assert samples["arr_0"].shape == (20, 8, 8, 3) and samples["arr_0"].dtype == np.uint8
        assert sorted(np.bincount(samples["arr_1"])) == [2] * 10


def test_a_fine_tune_starts_from_a_run_in_the_bucket(bucket_run, reference, data_dir, tmp_path, capsys):
    # The bucket run's last state is the local run's (the first test): a fine-tune from each, with
    # the same configuration, ends in the same state.
    finetunes = {}
    for name, source in (("bucket", bucket_run.workdir), ("local", reference)):
        config = tl.tiny_config(data_dir, init_from=source, num_train_steps=STEPS + 2, checkpoint_every=EVERY)
        finetunes[name] = str(tmp_path / name)
        train.train_and_evaluate(config, finetunes[name])
        assert f"initialised from {source}/checkpoints step {STEPS}" in capsys.readouterr().out
        assert min(tl.logged(finetunes[name])) == STEPS + 1  # continues at the source's step
    assert checkpoint.saved_steps(bucket_run.workdir)[-1] == STEPS  # the source run is only read
    _assert_same_state(finetunes["bucket"], finetunes["local"], STEPS + 2)


# Compiles a small program with the persistent cache in argv[1] (runtime.enable_compilation_cache,
# as main does with config.compilation_cache_dir); prints the cache events jax reported.
_COMPILE_WITH_CACHE = r"""
import json, sys
import jax, jax.numpy as jnp
from jax._src import monitoring
from tread_jax import runtime
events = set()
monitoring.register_event_listener(lambda event, **_: events.add(event.rsplit("/", 1)[-1]))
runtime.enable_compilation_cache(sys.argv[1], sys.argv[2])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: jnp.sin(x) @ x.T + 1)(jnp.ones((32, 32))).block_until_ready()
print(json.dumps(sorted(events & {"cache_hits", "cache_misses"})))
"""


def test_the_compilation_cache_can_live_in_the_bucket(gcs_bucket, tmp_path):
    cache = f"{gcs_bucket}/compilation_cache"
    env = tl.subprocess_env()
    del env["JAX_COMPILATION_CACHE_DIR"]  # the tests' shared local cache would win
    found = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", _COMPILE_WITH_CACHE, cache, str(tmp_path)], cwd=tl.REPO,
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        found.append(json.loads(done.stdout.splitlines()[-1]))
        if len(found) == 1:
            entries = [p.name for p in epath.Path(cache).iterdir()]
            assert any(name.startswith("jit__lambda-") for name in entries), entries
    assert found == [["cache_misses"], ["cache_hits"]]  # the second process compiled nothing
    assert not list(tmp_path.iterdir())  # nothing went to a local folder under the workdir


def test_reference_statistics_go_to_the_bucket(gcs_bucket):
    rng = np.random.default_rng(0)
    stats = fid.ReferenceStatistics(mu=rng.normal(size=4), sigma=np.eye(4), mu_s=rng.normal(size=3), sigma_s=np.eye(3))
    features = rng.normal(size=(5, 4)).astype(np.float32)
    reference_stats.write_reference(f"{gcs_bucket}/stats/reference.npz", stats, features)
    content = epath.Path(f"{gcs_bucket}/stats/reference.npz").read_bytes()
    read = fid.read_adm_statistics(io.BytesIO(content))
    for name in ("mu", "sigma", "mu_s", "sigma_s"):
        np.testing.assert_array_equal(getattr(read, name), getattr(stats, name))
    with np.load(io.BytesIO(content)) as saved:
        np.testing.assert_array_equal(saved[reference_stats.PR_FEATURES], features)


def test_two_processes_write_one_checkpoint_to_the_bucket(gcs_bucket, data_dir, reference, tmp_path):
    config = tl.tiny_config(data_dir, num_train_steps=TWO_PROCESS_STEPS, checkpoint_every=TWO_PROCESS_STEPS,
                            **{"mesh.data": 1, "mesh.fsdp": 2})
    config_file = tl.write_config(config, tmp_path / "two.py")
    workdir = f"{gcs_bucket}/two_processes"
    port = tl.free_port()
    # One device per process and an FSDP axis across the two: each process writes its own half of
    # the sharded arrays.
    env = {**tl.subprocess_env(), "JAX_NUM_CPU_DEVICES": "1"}
    procs = [
        subprocess.Popen(tl.main_command(config_file, workdir, f"--coordinator_address=127.0.0.1:{port}",
                                         "--num_processes=2", f"--process_id={i}"),
                         cwd=tl.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    assert checkpoint.saved_steps(workdir) == [TWO_PROCESS_STEPS]
    step_dir = epath.Path(workdir) / "checkpoints" / str(TWO_PROCESS_STEPS)
    iterator_files = sorted(p.name for p in (step_dir / "data").iterdir() if p.name.startswith("process_"))
    assert iterator_files == ["process_0-of-2.json", "process_1-of-2.json"]
    # The shards both processes wrote make up the one-device run's parameters of that step.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 tl.load_state(workdir, TWO_PROCESS_STEPS)["params"],
                 tl.load_state(reference, TWO_PROCESS_STEPS)["params"])


def test_preflight_names_the_bucket_and_the_problem_in_one_line(gcs_bucket, data_dir, tmp_path):
    argv = ["tread_jax.main", f"--config={tl.DIGITS_CONFIG}", f"--config.data.data_dir={data_dir}"]
    # A fine-tune config (the check of init_from comes before the dataset's) and a local workdir.
    finetune = ["tread_jax.main", f"--config={tl.REPO}/configs/imagenet256.py:dit_s2_tread_ft", f"--workdir={tmp_path}/ft"]
    bad_key = tmp_path / "key.json"
    bad_key.write_text('{"type": "authorized_user"}')  # a credentials file without its secrets
    # {environment changes: {case: (arguments, error type, start of the error line, what it must say)}}
    groups = {
        (): {
            "missing bucket": ([*argv, "--workdir=gs://no-such-bucket/run"], "PermissionError", "workdir",
                               "bucket 'gs://no-such-bucket' is not writable from this machine: the bucket does not exist"),
            "init_from in a missing bucket": ([*finetune, "--config.init_from=gs://no-such-bucket/routed"],
                                              "FileNotFoundError", "init_from",
                                              "holds no checkpoint (looked in gs://no-such-bucket/routed/checkpoints)"),
        },
        (("FSSPEC_GCS_TOKEN", str(bad_key)),): {
            "bad credentials": ([*argv, f"--workdir={gcs_bucket}/run"], "PermissionError", "workdir",
                                f"bucket '{gcs_bucket}' is not writable from this machine: no usable credentials"),
            "init_from with bad credentials": ([*finetune, f"--config.init_from={gcs_bucket}/routed"], "PermissionError",
                                               "init_from", f"bucket '{gcs_bucket}' cannot be read from this machine: "
                                                            "no usable credentials"),
        },
    }
    for changes, cases in groups.items():
        commands = []
        for name, (command, *_) in cases.items():
            (tmp_path / name).mkdir()
            commands.append((name, command, tmp_path / name, "run"))
        found = cli_testlib.run_commands(commands, {**os.environ, **tl.subprocess_env(), **dict(changes)})
        for name, (_, error, subject, message) in cases.items():
            code, output, kind = found[name]
            lines = output.strip().splitlines()
            assert code == 1 and kind == error, output[-2000:]
            assert lines[-1].startswith(f"tread_jax: error: {subject} ") and message in lines[-1], output[-2000:]
            assert cli_testlib.PREFLIGHT_PASSED not in output and "Traceback" not in output
            assert not (tmp_path / name / "jax_cache").exists()  # nothing was compiled
