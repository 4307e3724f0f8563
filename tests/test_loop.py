"""The loop's host side: device prefetch keeps the saved input position exact, several steps per
call compute what one step per call computes, profiles and the compilation cache land in the
workdir."""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest

import trainer_testlib as tl
from tread_jax import data, train
from tread_jax.prefetch import DevicePrefetcher

tl.enable_compilation_cache()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


def _iterator(data_dir: str):
    config = tl.tiny_config(data_dir)
    return data.create_train_iterator(config.data, global_batch_size=4, seed=0, process_index=0, process_count=1)


@pytest.mark.parametrize("batches_per_item", [1, 3])
def test_prefetched_position_resumes_after_the_consumed_item(data_dir, batches_per_item):
    want = [next(it) for it in [_iterator(data_dir)] for _ in range(4 * batches_per_item)]
    prefetcher = DevicePrefetcher(_iterator(data_dir), lambda batch: batch, depth=2,
                                  batches_per_item=batches_per_item, num_items=4)
    items = [next(prefetcher) for _ in range(2)]  # the prefetcher has read a third item by now
    prefetcher.refill()
    first, position = items[0]
    label = first["label"] if batches_per_item == 1 else first["label"][0]
    np.testing.assert_array_equal(label, want[0]["label"])

    resumed = _iterator(data_dir)
    resumed.set_state(json.loads(position.get_state()))
    np.testing.assert_array_equal(next(resumed)["label"], want[batches_per_item]["label"])
    # Nothing is read beyond the items asked for.
    assert len(list(prefetcher)) == 2


def test_four_steps_per_call_equal_four_calls(data_dir, tmp_path):
    runs = {per_call: str(tmp_path / f"k{per_call}") for per_call in (1, 4)}
    train.train_and_evaluate(tl.tiny_config(data_dir, log_every=4, checkpoint_every=4), runs[1])
    for steps in (4, 8):  # four steps per call, stopped after the first call and resumed
        config = tl.tiny_config(data_dir, steps_per_call=4, log_every=4, checkpoint_every=4, num_train_steps=steps)
        train.train_and_evaluate(config, runs[4])
    assert tl.saved_steps(runs[4]) == [4, 8]
    jax.tree.map(np.testing.assert_array_equal, tl.load_state(runs[4], 8), tl.load_state(runs[1], 8))
    assert tl.logged(runs[4]) == tl.logged(runs[1])


def test_profile_steps_write_a_trace(data_dir, tmp_path):
    config = tl.tiny_config(data_dir, num_train_steps=6, profile_steps=2)
    train.train_and_evaluate(config, str(tmp_path))
    traces = list((tmp_path / "profile").glob("plugins/profile/*/perfetto_trace.json.gz"))
    assert len(traces) == 1
    assert b"traceEvents" in gzip.decompress(traces[0].read_bytes())
    assert [p.stat().st_size > 0 for p in traces[0].parent.glob("*.xplane.pb")] == [True]


def test_compilation_cache_in_the_workdir_serves_the_restarted_run(data_dir, tmp_path):
    env = tl.subprocess_env()
    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                 "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"):
        env.pop(name)
    workdir = tmp_path / "run"
    for steps in (4, 8):  # the second run resumes at 4 and compiles the train step again
        config_file = tl.write_config(tl.tiny_config(data_dir, num_train_steps=steps), tmp_path / f"c{steps}.py")
        done = subprocess.run(
            tl.main_command(config_file, str(workdir)), cwd=tl.REPO, env=dict(env, JAX_LOG_COMPILES="1"),
            capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        if steps == 4:
            assert any(p.is_file() for p in Path(workdir, "compilation_cache").iterdir())
    assert "Persistent compilation cache hit for 'jit_call'" in done.stderr, done.stderr[-3000:]


def test_non_finite_step_inside_a_call_is_named_and_never_saved(data_dir, tmp_path):
    # As in test_checkpoint: step 1's update overflows the parameters, step 2's loss is not
    # finite; both run in the first call of two steps, whose state must not be saved.
    config = tl.tiny_config(data_dir, steps_per_call=2, checkpoint_every=2, log_every=2,
                            **{"optim.learning_rate": 1e38, "optim.warmup_steps": 0})
    with pytest.raises(FloatingPointError, match=r"at step 2; stopping \(no checkpoint was written\)"):
        train.train_and_evaluate(config, str(tmp_path))
    assert tl.saved_steps(str(tmp_path)) == []
