"""The one sampler: sample i depends on (seed, i) alone, not on the batch size or the device
count; and the one uint8 convention for every image that leaves the package."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax
import numpy as np

import trainer_testlib as tl
from tread_jax import logging_utils, pixels
from tread_jax.metrics import evaluator

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    import jax, numpy as np
    import trainer_testlib as tl
    from tread_jax import data, sharding
    from tread_jax.model_builder import ModelBuilder
    from tread_jax.sampler import Sampler

    assert jax.device_count() == 8
    config = tl.tiny_config({data_dir!r})
    model = ModelBuilder(config, data.DatasetInfo("digits", (8, 8, 1), 10, 0, 0))
    params = model.init_params()
    labels = np.arange(32) % 10
    out = {{}}
    for devices in (1, 8):
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]).reshape(devices, 1), sharding.MESH_AXES)
        shardings = sharding.state_shardings(jax.eval_shape(lambda: params), mesh, config.fsdp_min_size)
        sampler = Sampler(config, model, mesh, shardings, num_steps=3, name=f"test_{{devices}}")
        placed = jax.device_put(params, shardings)
        for batch in (8, 32):
            out[f"{{devices}}_{{batch}}"] = sampler.sample(placed, labels, seed=5, batch_size=batch).tolist()
        # The first 8 samples of 32 are the 8 samples of a run asked for 8.
        out[f"{{devices}}_first8"] = sampler.sample(placed, labels[:8], seed=5).tolist()
        out[f"{{devices}}_seed6"] = sampler.sample(placed, labels[:8], seed=6).tolist()
    print(json.dumps(out))
    """
)


def test_samples_do_not_depend_on_batch_size_or_device_count(tmp_path):
    script = _SCRIPT.format(tests=str(tl.REPO / "tests"), data_dir=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], env=tl.subprocess_env(8), cwd=tl.REPO,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    out = {k: np.asarray(v) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    reference = out["1_32"]
    assert reference.shape == (32, 8, 8, 1) and reference.std() > 0 and np.abs(reference).max() <= 1.0
    for key in ("1_8", "8_8", "8_32"):
        np.testing.assert_allclose(out[key], reference, rtol=0, atol=1e-5, err_msg=key)
    for devices in (1, 8):
        np.testing.assert_allclose(out[f"{devices}_first8"], reference[:8], rtol=0, atol=1e-5)
        assert np.abs(out[f"{devices}_seed6"] - reference[:8]).max() > 0.1  # another seed, other noise


def test_one_uint8_convention_for_grids_and_scoring():
    # clip(127.5 x + 128, 0, 255) truncated (DiT's and EDM's sampling scripts), ties included.
    ties = ((np.arange(255) + 0.5) / 127.5 - 1).astype(np.float32)  # where round() and floor() part
    x = np.concatenate([np.linspace(-1.02, 1.02, 2001, dtype=np.float32), ties]).reshape(1, 1, -1, 1)
    expected = np.clip(x * 127.5 + 128.0, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(pixels.to_uint8(x), expected)
    # On device XLA may fuse the multiply-add (one rounding instead of two), which moves exact
    # ties by one level; everywhere else the scored pixels are the saved ones.
    on_device = np.asarray(jax.jit(evaluator.to_uint8)(x))
    assert on_device.shape == (1, 1, x.shape[2], 3)
    np.testing.assert_array_equal(on_device[..., :2001, :1], expected[..., :2001, :])
    grid = np.asarray(logging_utils.image_grid(x, columns=1, pad=0))
    np.testing.assert_array_equal(grid, expected[0, :, :, 0])
