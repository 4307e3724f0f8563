"""Smoke tests of the benchmark scripts: each runs as a subprocess on a tiny configuration and
its reported figures must be sane. The scripts are not imported by the package, so without
these tests a change in the trainer's interfaces would break them unnoticed."""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
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
    assert result["params"] > 0 and result["route"] == [
        {"start": 0, "end": 1, "ratio": 0.5, "group": 0, "rejoin": "tread", "path_drop": 0.0}]
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
    assert result["route"] == [
        {"start": 0, "end": 1, "ratio": 0.5, "group": 0, "rejoin": "tread", "path_drop": 0.0}]


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


def test_sampling_compare_guidance(tmp_path):
    steps = 3
    # Depth 6: the published placements (TREAD 2..depth-4, SPRINT 2..depth-3) need 6 blocks.
    result = _run_json(tmp_path, "sampling.py", *TINY_DIT, "--overrides=depth=6,hidden_size=32,num_heads=2",
                       f"--num_steps={steps}", "--compare_guidance", "--sparsity=0.5,0.0")
    table = result["gflops_per_image"]
    assert result["evaluations_per_image"] == 2 * steps - 1
    assert table["cfg"] == pytest.approx(2 * table["none"])
    # Strong 0 is the dense pass; the weak one routes half the tokens of blocks 2..depth-4.
    assert table["none"] < table["sparse_0.5_0"] < table["cfg"]
    assert table["none"] < table["path_drop"] < table["cfg"]


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


TINY_DIGITS = ["--depth=4", "--width=32", "--heads=2", "--batch=8"]


def test_routed_step_times_trainer_and_reference():
    out = json.loads(_run("routed_step.py", *TINY_DIGITS, "--reps=2", "--steps=1", "--json").splitlines()[-1])
    programs = {f"{who} {kind}" for who in ("trainer", "reference") for kind in ("dense", "routed")}
    assert set(out["steps_per_s"]) == programs
    assert _positive(*out["steps_per_s"].values(), *(v for k, v in out.items() if k != "steps_per_s"))
    assert out["routed/dense FLOPs"] < 1.0


@pytest.mark.parametrize("routed", [False, True])
def test_minimal_reference_computes_the_trainers_loss(routed):
    """Same weights, batch and step: the reference's loss is the trainer's (same random draws,
    same model math), so the benchmark compares the same computation."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        minimal_reference = importlib.import_module("minimal_reference")
        routed_step = importlib.import_module("routed_step")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import jax
    import jax.numpy as jnp

    from tread_jax import diffusion, routing, train_state
    from tread_jax.train_step import make_train_step

    config, model = routed_step.digits_setup(4, 32, 2)
    params = model.init_params()
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    # Random weights everywhere (adaLN-Zero starts at zero, which would hide the blocks).
    params = jax.tree.unflatten(treedef, [w + 0.1 * jax.random.normal(k, w.shape) for w, k in zip(leaves, keys)])
    batch = {"image": jax.random.uniform(jax.random.key(1), (8, 8, 8, 1), minval=-1.0, maxval=1.0),
             "label": jnp.arange(8) % 10}
    tx = train_state.create_optimizer(config.optim)
    routes = routing.parse_routes(config.routes) if routed else ()
    step = make_train_step(config, model, diffusion.create_objective(config.diffusion), tx, routes)
    state = train_state.init_train_state(params, tx).replace(step=jnp.asarray(7, jnp.int32))
    _, metrics = jax.jit(step)(state, batch)
    spec = routed_step.reference_spec(config, model, routed)
    reference = minimal_reference.loss(spec, minimal_reference.from_tread_params(params), batch["image"],
                                       batch["label"], jnp.asarray(7))
    assert abs(float(metrics.compute()["loss"]) - float(reference)) < 1e-5 * abs(float(reference))


def test_ssm_scan():
    out = _run("ssm_scan.py", "--lengths=16", "--batch=1", "--channels=4", "--state=2", "--reps=2")
    row = re.search(r"^\| 16 \| (\S+) \| (\S+) \| (\S+) \|$", out, re.MULTILINE)
    associative, sequential, ratio = map(float, row.groups())
    assert _positive(associative, sequential, ratio)
    # The table rounds each figure to 0.01 (ms and ratio): the ratio lies within what the
    # rounded times allow, which at these sub-millisecond times is a wide interval.
    half = 0.005
    assert (sequential - half) / (associative + half) - half <= ratio <= (sequential + half) / (associative - half) + half


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
    assert "(79 evaluations per image: edm, 40 steps)" in out  # Heun: 2N - 1


def test_estimate_counts_the_configs_sampler_and_guidance():
    # DiT's DDPM sampler: one evaluation per step, doubled by the config's guidance 1.5.
    out = _run("estimate.py", "--config=configs/dit_xl2_pretrained.py:256_cfg1.5")
    assert "(500 evaluations per image: ddpm, 250 steps, guided)" in out
    out = _run("estimate.py", "--config=configs/imagenet256.py:sit_b2_tread", "--fid_steps=100", "--guided")
    assert "(200 evaluations per image: flow, 100 steps, guided)" in out  # Euler: N


def test_estimate_counts_repa_on_its_own_line():
    out = _run("estimate.py", "--config=configs/imagenet256.py:dit_xl2_repa", "--mfu=0.5")
    line = next(line for line in out.splitlines() if line.startswith("REPA per image"))
    # DINOv2-B/14 at 224 (23.16 G) and the 256 -> 224 resize; REPA's projector fwd + bwd on 256 tokens.
    assert "encoder 23.24 GMACs" in line and "projector and loss 6.24 GMACs" in line
    assert "7.7% of the training step's FLOPs (encoder 6.0%), +8.3% over the step without REPA" in line
    dense_gmacs = float(re.search(r"GMACs per image: ([\d.]+) routed", out).group(1))
    train_flop = 2 * (3 * dense_gmacs + 23.24 + 6.24) * 1e9 * 256 * 400_000
    assert float(re.search(r"training ([\d.e+]+) FLOP", out).group(1)) == pytest.approx(train_flop, rel=2e-3)


def _accelerator_module(name: str):
    """``benchmarks/<name>.py`` imported as the scripts import each other (their folder on the path)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_accelerator_tiny_runs_every_section(tmp_path):
    """The accelerator command end to end at tiny sizes on CPU, as CI runs it."""
    out = _run("accelerator.py", "--tiny", f"--out_dir={tmp_path}")
    summary = json.loads((tmp_path / "accelerator.json").read_text())
    sections = summary["sections"]
    assert list(sections) == ["peak", "train_B2", "train_XL2", "sample_XL2", "evaluation", "digits_parity",
                              "torch_reference"]
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(sections, "ok"), sections
    assert _positive(sections["peak"]["result"]["bfloat16_tflops"], sections["peak"]["result"]["float32_tflops"])
    train = sections["train_XL2"]["result"]
    assert train["dtype"] == "bfloat16" and 0 < train["flop_ratio_analytic"] < 1
    parity = sections["digits_parity"]["result"]
    assert parity["agree"] and len(parity["device_losses"]) == len(parity["cpu_losses"]) == parity["steps"] == 10
    assert _positive(sections["torch_reference"]["result"]["images_per_s"])

    table = (tmp_path / "accelerator.md").read_text()
    assert table in out and "Not finished" not in table
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 2 + 2 + 1 + 2 + 1 + 1  # train x2 variants x2, sampler, Inception + VAE, parity, torch
    # MFU (third column) is filled for every JAX row with a model FLOP count.
    assert all(row[2].endswith("%") for row in rows[:7]), rows
    assert "routed/dense time" in table and "tread_jax dense / PyTorch images/s" in table


def test_accelerator_full_plan_measures_the_paper_sizes_within_8_minutes():
    accelerator = _accelerator_module("accelerator")
    plan = {s.name: s for s in accelerator.plan(tiny=False, extended=False)}
    assert sum(s.budget_s for s in plan.values()) <= 480
    for name, model in (("train_B2", "DiT-B/2"), ("train_XL2", "DiT-XL/2")):
        args = plan[name].args
        assert f"--model={model}" in args and "--batch=256" in args and "--dtype=bfloat16" in args
        assert not any(a.startswith("--route") for a in args)  # the default route 2..depth-4, 0.5
    assert {"--model=DiT-XL/2", "--num_steps=40", "--dtype=bfloat16"} <= set(plan["sample_XL2"].args)
    extended = [s.name for s in accelerator.plan(tiny=False, extended=True)][len(plan):]
    assert extended == ["train_XL2_repa", "train_XL2_scan", "train_XL2_remat_dots", "train_XL2_remat_full"]
    assert {"--repa_encoder=dinov2-vitb14", "--repa_depth=8", "--model=DiT-XL/2", "--batch=256"} <= set(
        accelerator.plan(tiny=False, extended=True)[len(plan)].args)


def test_accelerator_repa_section_measures_the_share_beside_the_analytic_one(tmp_path):
    """REPA off and on (same batch, route, dtype) and the encoder alone, in one run, tabulated."""
    out = _run("accelerator.py", "--tiny", "--only=train_XL2_repa", f"--out_dir={tmp_path}")
    record = json.loads((tmp_path / "accelerator.json").read_text())["sections"]["train_XL2_repa"]
    assert record["status"] == "ok", record
    result = record["result"]
    assert list(result["variants"]) == ["plain", "repa"] and result["route"][0]["ratio"] == 0.5
    repa = result["repa"]
    assert len(repa["encoder_s_all"]) == len(result["variants"]["repa"]["step_s_all"]) == 2
    assert repa["overhead_measured"] == pytest.approx(result["time_ratio_median_of_pairs"] - 1)
    assert _positive(repa["encoder_s_median"], repa["encoder_share_measured"], repa["encoder_share_analytic"],
                     repa["overhead_analytic"])
    # The REPA variant's analytic step adds exactly the encoder, projector and loss.
    plain, with_repa = result["variants"]["plain"], result["variants"]["repa"]
    assert with_repa["step_gmacs_analytic"] == pytest.approx(
        plain["step_gmacs_analytic"] * (1 + repa["overhead_analytic"]))
    assert "REPA step time +" in out and "dinov2-vits14" in out


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_text(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:  # the process ended meanwhile
            pass
    return pids


def test_accelerator_records_failures_and_timeouts_and_goes_on(tmp_path):
    accelerator = _accelerator_module("accelerator")
    report = _accelerator_module("accelerator_report")
    # The parity check's trainers put their workdirs under TMPDIR: their command lines name it.
    (tmp_path / "tmp").mkdir()
    env = dict(os.environ, JAX_PLATFORMS="cpu", TMPDIR=str(tmp_path / "tmp"))
    with open(tmp_path / "log", "w") as log:
        failed = accelerator.run_section(
            accelerator.Section("bad", "accelerator_checks.py", ("no_such_check",), 60), 60, tmp_path, env, log)
        start = time.monotonic()
        slow = accelerator.run_section(
            accelerator.Section("slow", "accelerator_checks.py", ("digits_parity", "--tiny"), 60), 12, tmp_path, env,
            log)
        assert time.monotonic() - start < 20
    assert failed["status"] == "failed" and "one check" in failed["error"]
    assert slow["status"] == "timeout" and "12 s limit" in slow["error"]
    # The trainers the timed-out section had started were stopped with it.
    time.sleep(0.5)
    assert _processes_mentioning(str(tmp_path / "tmp")) == []
    # A section whose script changed its output still leaves the rest of the table.
    changed = {"status": "ok", "result": {"variants": {}}}
    table = report.markdown_table({"sections": {"bad": failed, "slow": slow, "train_B2": changed},
                                   "date": "d", "total_s": 3.0, "tiny": True})
    assert "- `bad`: failed:" in table and "- `slow`: timeout:" in table
    assert "- `train_B2`: ran, but its result could not be tabulated (KeyError" in table


def test_accelerator_wheels_fetch_only_what_the_device_image_lacks():
    from test_launch import shellcheck_binary  # pylint: disable=g-import-not-at-top

    script = ROOT / "benchmarks" / "accelerator_wheels.sh"
    lint = subprocess.run([shellcheck_binary(), "--external-sources", "--severity=style", str(script)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert lint.returncode == 0, lint.stdout
    out = subprocess.run(["bash", str(script), "--dry-run", "/tmp/w"], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    mkdir, download, build = [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]
    assert mkdir == ["mkdir", "-p", "/tmp/w"] and build[-1] == "promise"
    assert {"--no-deps", "--only-binary=:all:", "manylinux_2_28_x86_64", "manylinux2014_x86_64"} <= set(download)
    assert download[download.index("--python-version") + 1] == "3.12"
    names = {re.split(r"[=<>]", a)[0].lower() for a in download[download.index("/tmp/w") + 1:]}
    # What the scripts import and the image lacks; nothing it has (jax, numpy, torch) travels.
    assert {"grain", "clu", "ml-collections", "tensorflow-datasets", "tensorboardx", "diffusers"} <= names
    assert not names & {"jax", "jaxlib", "numpy", "flax", "torch", "protobuf"}


def test_accelerator_only_and_out_of_budget(tmp_path):
    # A budget under MIN_SECTION_S leaves no time for any section: each is recorded as skipped.
    out = _run("accelerator.py", "--tiny", "--only=peak,digits_parity", "--budget_s=9", f"--out_dir={tmp_path}")
    sections = json.loads((tmp_path / "accelerator.json").read_text())["sections"]
    assert list(sections) == ["peak", "digits_parity"]
    assert all(s["status"] == "skipped" and "out of time" in s["error"] for s in sections.values())
    assert "- `peak`: skipped: out of time" in out
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accelerator.py"), "--only=nope",
                          f"--out_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown sections ['nope']" in bad.stderr


def test_host_overhead(tmp_path):
    result = _run_json(tmp_path, "host_overhead.py", "--steps=8", "--repeats=1", "--steps_per_call=2",
                       f"--data_dir={tmp_path / 'tfds'}")
    assert result["steps_per_call"] == 2 and len(result["loop_ms_all"]) == len(result["bare_ms_all"]) == 1
    assert _positive(result["loop_ms_per_step_median"], result["bare_step_ms_median"])
    assert math.isfinite(result["overhead_ms_per_step_median"])
