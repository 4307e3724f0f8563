"""Smoke tests of the benchmark scripts: each runs as a subprocess on a tiny configuration and
its reported figures must be sane. The scripts are not imported by the package, so without
these tests a change in the trainer's interfaces would break them unnoticed."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_DIT = [
    "--model=DiT-S/2",
    "--overrides=depth=2,hidden_size=32,num_heads=2",
    "--input_size=8",
    "--in_channels=1",
    "--num_classes=10",
    "--batch=4",
]


def _run(script: str, *args: str) -> str:
    """Runs ``benchmarks/<script>`` on CPU; returns its stdout, fails with its stderr."""
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        OPENBLAS_NUM_THREADS="1",
        # Compile without LLVM optimisation: these tiny programs compile about twice as fast,
        # and what is checked here (program structure, FLOP counts, plumbing) does not change.
        XLA_FLAGS="--xla_backend_optimization_level=0",
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-4000:]}"
    return proc.stdout


def _run_json(tmp_path: Path, script: str, *args: str) -> dict:
    out = tmp_path / "result.json"
    _run(script, *args, f"--json_out={out}")
    return json.loads(out.read_text())


def _positive(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def test_train_step(tmp_path):
    result = _run_json(
        tmp_path, "train_step.py", *TINY_DIT, "--route=0,1,0.5", "--steps=2", "--matmul_size=128"
    )
    assert result["params"] > 0 and result["route"] == [{"start": 0, "end": 1, "ratio": 0.5}]
    for variant in result["variants"].values():
        assert _positive(
            variant["compile_s"], variant["step_s_median"], variant["images_per_s"],
            variant["tokens_per_s"], variant["step_tflops_xla"], variant["mfu"],
        )
        assert len(variant["step_s_all"]) == 2
    for key in ("flop_ratio_analytic", "flop_ratio_xla_fwd", "flop_ratio_xla_step"):
        assert 0 < result[key] < 1, key
    assert _positive(result["time_ratio_median_of_pairs"], result["matmul_peak_tflops"])


def test_compile_time(tmp_path):
    # One variant keeps this test short; test_train_step compiles both.
    result = _run_json(tmp_path, "compile_time.py", *TINY_DIT, "--route=0,1,0.5", "--variants=routed")
    assert set(result["variants"]) == {"routed"}
    routed = result["variants"]["routed"]
    assert _positive(routed["trace_s"], routed["lower_s"], routed["compile_s"], routed["step_tflops_xla"])
    assert routed["total_s"] == pytest.approx(routed["trace_s"] + routed["lower_s"] + routed["compile_s"])
    assert result["depth"] == 2 and result["params"] > 0
    assert result["route"] == [{"start": 0, "end": 1, "ratio": 0.5}]


def test_sampling_guided(tmp_path):
    steps = 3
    result = _run_json(
        tmp_path, "sampling.py", *TINY_DIT, f"--num_steps={steps}", "--guidance=1.5",
        "--reps=2", "--matmul_size=128",
    )
    assert result["evaluations_per_image"] == 2 * steps - 1
    assert result["forward_passes_per_image"] == 2 * (2 * steps - 1)  # guided: doubled batch
    # The analytic count leaves out elementwise work, so XLA's is a little higher.
    assert 1.0 <= result["gflops_per_image_xla"] / result["gflops_per_image_analytic"] < 1.2
    # The docstring's claim: XLA counts the sampler's loop body (2 evaluations) once, + 1 final.
    assert result["xla_sampler_evals_counted"] == pytest.approx(3.0, abs=0.05)
    assert _positive(
        result["compile_s"], result["batch_s_median"], result["images_per_s"],
        result["mfu_xla"], result["mfu_analytic"],
    )
    assert result["images_per_s"] == pytest.approx(result["batch"] / result["batch_s_median"])


def test_evaluation(tmp_path):
    result = _run_json(
        tmp_path, "evaluation.py", "--batch=1", "--reps=1", "--image_size=32",
        "--vae_latent_size=2", "--matmul_size=128",
    )
    inception, decoder = result["networks"]["inception"], result["networks"]["vae_decoder"]
    # FID Inception v3 at 299x299: about 5.7 G multiply-adds.
    assert 10 < inception["gflops_per_image_xla"] < 13
    assert decoder["input"] == [1, 2, 2, 4]
    for network in (inception, decoder):
        assert _positive(network["compile_s"], network["batch_s_median"], network["images_per_s"], network["mfu_xla"])


def test_attention():
    out = _run("attention.py", "--batch=1", "--tokens=16", "--heads=2", "--head_dim=8", "--reps=2")
    assert float(re.search(r"max \|grad q\| difference: (\S+)", out).group(1)) < 1e-4
    medians = dict(re.findall(r"^(\w+)\s+fwd\+bwd median\s+(\S+) ms", out, re.MULTILINE))
    assert set(medians) == {"dot_product_attention", "batched_matmul"}
    assert _positive(*map(float, medians.values()))


def test_ssm_scan():
    out = _run("ssm_scan.py", "--lengths=16", "--batch=1", "--channels=4", "--state=2", "--reps=2")
    row = re.search(r"^\| 16 \| (\S+) \| (\S+) \| (\S+) \|$", out, re.MULTILINE)
    associative, sequential, ratio = map(float, row.groups())
    assert _positive(associative, sequential, ratio)
    assert ratio == pytest.approx(sequential / associative, rel=0.05)  # table rounds to 0.01


def test_estimate_matches_a_hand_count():
    out = _run("estimate.py", "--config=configs/imagenet256.py:dit_xl2_tread", "--mfu=0.5",
               "--usd_per_chip_hour=h100=2.0")
    # DiT-XL/2 forward (paper: 118.64 GMACs) with blocks 2..24 on 128 of 256 tokens.
    routed_gmacs = float(re.search(r"GMACs per image: ([\d.]+) routed", out).group(1))
    assert 118.64 * 0.55 < routed_gmacs < 118.64 * 0.62
    train_flop = 6 * routed_gmacs * 1e9 * 256 * 400_000  # 3 forwards x 2 FLOP per MAC
    row = next(line.split() for line in out.splitlines() if line.startswith("h100"))
    hours = train_flop / (8 * 989e12 * 0.5) / 3600
    assert float(row[3]) == pytest.approx(hours, abs=0.05)
    assert abs(int(row[5]) - hours * 8 * 2.0) <= 1  # chip-hours x the price passed
