"""``--check``: preflight plus a description of the run, compiled from abstract shapes only."""

from __future__ import annotations

import os
import subprocess
import sys

import trainer_testlib as tl
from tread_jax import data, run_check


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tread_jax.main", *args, "--check"], cwd=tl.REPO,
                          env=tl.subprocess_env(), capture_output=True, text=True, timeout=300)


def test_check_describes_the_digits_run_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    done = _check(f"--config={tl.DIGITS_CONFIG}", f"--workdir={workdir}")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "global_batch_size: 64" in out  # the resolved config
    assert "mesh {'data': 1, 'fsdp': 1}" in out
    assert "1,865,988 parameters" in out
    assert "model FLOPs per step" in out and "dense" in out and "routed" in out
    assert "train step memory per device (XLA estimate)" in out
    assert os.listdir(workdir) == []  # preflight's write probe is gone; nothing else was written

    bad = _check(f"--config={tl.DIGITS_CONFIG}", f"--workdir={workdir}", "--config.model.name=DiT-Q/2")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("tread_jax: error: unknown model 'DiT-Q/2'")


def test_check_of_the_imagenet_config_from_abstract_shapes(tmp_path, monkeypatch):
    # No ImageNet latents here: the dataset metadata is what prepare_latents would record. DiT-S/2
    # keeps the compile short; the XL/2 headline config takes about 95 s on a 2-core CPU.
    monkeypatch.setattr(data, "dataset_info", lambda c: data.DatasetInfo(c.name, (32, 32, 4), 1000, 1_281_167, 0))
    config = tl.load_config(tl.REPO / "configs" / "imagenet256.py", "dit_xl2_tread")
    config.model.name = "DiT-S/2"
    config.routes = (dict(start=2, end=8, ratio=0.5),)
    text = run_check.describe_run(config, str(tmp_path / "run"))
    assert "DiT-S/2 {}, 32,858,896 parameters" in text  # the paper: 33M
    routed_share = float(text.split("x dense")[0].rsplit("(", 1)[1])
    assert 0.6 < routed_share < 0.8  # the paper: about 0.70 of the dense forward for S
    assert "train step memory per device (XLA estimate)" in text
    assert os.listdir(tmp_path / "run") == []


def test_check_compiles_the_call_the_loop_runs(tmp_path):
    # With several steps per call the loop runs a lax.scan over stacked batches: --check must
    # estimate that program, not a one-step one.
    config = tl.load_config()
    config.model.overrides = dict(depth=2, hidden_size=32, num_heads=2)
    config.routes = (dict(start=0, end=0, ratio=0.5),)
    config.global_batch_size = 2048
    one = run_check.describe_run(config, str(tmp_path / "one"))
    config.steps_per_call = 4
    four = run_check.describe_run(config, str(tmp_path / "four"))
    assert "train step memory per device (XLA estimate, 4 steps per call)" in four

    def argument_mib(text: str) -> float:
        return float(text.split("= arguments ")[1].split(" MiB")[0])

    # The four stacked batches are arguments of the program: 3 more batches of 2048 8x8 images
    # (1.5 MiB of float32; the figures are printed to 0.1 MiB).
    assert argument_mib(four) - argument_mib(one) >= 1.4
