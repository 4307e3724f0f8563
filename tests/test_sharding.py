"""Mesh and partition rules, and sharded training equal to single-device training.

Multi-device checks run in subprocesses with 8 fake CPU devices (jax fixes the device count
at import).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import trainer_testlib as tl
from tread_jax import sharding, train

tl.enable_compilation_cache()
STEPS = 6


def test_mesh_shape_resolves_the_rest_and_rejects_bad_sizes():
    assert sharding.mesh_shape({"data": -1, "fsdp": 2}, 8) == (4, 2)
    assert sharding.mesh_shape({"data": 4, "fsdp": -1}, 8) == (4, 2)
    assert sharding.mesh_shape({"data": -1, "fsdp": 1}, 1) == (1, 1)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        sharding.mesh_shape({"data": -1, "fsdp": 3}, 8)
    with pytest.raises(ValueError, match="uses 4 of 8 devices"):
        sharding.mesh_shape({"data": 2, "fsdp": 2}, 8)


def test_param_spec_shards_largest_divisible_dimension_above_threshold():
    spec = lambda shape, fsdp=2, min_size=256: sharding.param_spec(shape, fsdp, min_size)
    assert spec((64, 128)) == P(None, "fsdp")
    assert spec((128, 64)) == P("fsdp")
    assert spec((1002, 8), fsdp=4) == P(None, "fsdp")  # 1002 is not divisible by 4
    assert spec((3, 5)) == P()  # below the size threshold: replicated
    assert spec((7, 9, 11)) == P()  # nothing divisible: replicated
    assert spec((64, 128), fsdp=1) == P()


_SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    import jax, numpy as np
    import trainer_testlib as tl
    from tread_jax import data, model_builder, sharding, train_state
    config = tl.tiny_config({data_dir!r})
    mesh = sharding.create_mesh({{"data": 4, "fsdp": 2}})
    model = model_builder.ModelBuilder(config, data.dataset_info(config.data))
    tx = train_state.create_optimizer(config.optim)
    abstract = jax.eval_shape(lambda: train_state.init_train_state(model.init_params(), tx))
    shardings = sharding.state_shardings(abstract, mesh, config.fsdp_min_size)
    specs = lambda tree: [str(s.spec) for s in jax.tree.leaves(tree)]
    shapes = lambda tree: [list(x.shape) for x in jax.tree.leaves(tree)]
    local = {{"image": np.arange(16 * 2, dtype=np.float32).reshape(16, 2), "label": np.arange(16, dtype=np.int32)}}
    batch = sharding.global_batch(local, mesh)
    stacked = sharding.global_batch({{"label": np.arange(3 * 16, dtype=np.int32).reshape(3, 16)}}, mesh, stacked=True)
    print(json.dumps({{
        "mesh": dict(mesh.shape),
        "param_specs": specs(shardings.params), "param_shapes": shapes(abstract.params),
        "mu_specs": specs(shardings.opt_state[0].mu), "ema_specs": specs(shardings.ema_params),
        "batch_shards": sorted(len(s.data) for s in batch["label"].addressable_shards),
        "batch_ok": bool(np.array_equal(np.asarray(batch["image"]), local["image"])),
        "stacked_shards": sorted(list(s.data.shape) for s in stacked["label"].addressable_shards),
    }}))
    """
)


def test_state_and_batch_shardings_on_eight_devices(tmp_path):
    script = _SHARDED_SCRIPT.format(tests=str(tl.REPO / "tests"), data_dir=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], env=tl.subprocess_env(8), cwd=tl.REPO,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["mesh"] == {"data": 4, "fsdp": 2}
    sharded = [spec for spec in out["param_specs"] if "fsdp" in spec]
    big = [shape for shape in out["param_shapes"] if np.prod(shape) >= 256]
    assert sharded and len(sharded) == len(big)  # every large tiny-model kernel splits by 2
    # Optimizer moments and the EMA copy sit exactly where their parameters sit.
    assert out["mu_specs"] == out["param_specs"] == out["ema_specs"]
    assert out["batch_shards"] == [2] * 8 and out["batch_ok"]
    # Several steps' batches: every device holds its slice of each step's batch.
    assert out["stacked_shards"] == [[3, 2]] * 8


def test_eight_devices_match_one_device(tmp_path):
    data_dir = str(tmp_path / "tfds")
    single = tl.tiny_config(data_dir, num_train_steps=STEPS)
    train.train_and_evaluate(single, str(tmp_path / "one"))

    sharded = tl.tiny_config(data_dir, num_train_steps=STEPS, **{"mesh.data": 4, "mesh.fsdp": 2})
    config_file = tl.write_config(sharded, tmp_path / "sharded.py")
    done = tl.run_main(config_file, str(tmp_path / "eight"), num_devices=8)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mesh {'data': 4, 'fsdp': 2}" in done.stdout

    one, eight = tl.logged(str(tmp_path / "one")), tl.logged(str(tmp_path / "eight"))
    assert sorted(one) == sorted(eight) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([eight[s] for s in one], [one[s] for s in one], rtol=1e-5)

    # A global batch that the 8-way data-parallel mesh cannot split fails before compiling.
    bad = tl.write_config(tl.tiny_config(data_dir, global_batch_size=12), tmp_path / "bad.py")
    done = tl.run_main(bad, str(tmp_path / "bad"), num_devices=8)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "tread_jax: error: global_batch_size 12 is not divisible by the data-parallel size 8 "
        "(mesh data=8 x fsdp=1)"
    )
