"""The parts of ``benchmarks/accelerator.py`` that no other benchmark script covers, one per call:

    python benchmarks/accelerator_checks.py matmul --size=8192 --json_out=peak.json
    python benchmarks/accelerator_checks.py torch_reference --batch=256 --json_out=torch.json
    python benchmarks/accelerator_checks.py digits_parity --steps=100 --json_out=parity.json

- ``matmul``: the best bfloat16 and float32 FLOP/s of a square matmul on the default device,
  the denominators of every MFU figure of the run.
- ``torch_reference``: diffusers' ``DiTTransformer2DModel`` (DiT-XL/2 shape) train step in
  bfloat16 autocast with ``torch.compile``, AdamW, same batch: the same-GPU PyTorch figure to
  set beside tread_jax's. Skipped (reported, exit 0) where torch or diffusers is missing.
- ``digits_parity``: the trainer (``python -m tread_jax.main``, digits config) for N steps on
  the default device and again on the host CPU (``JAX_PLATFORMS=cpu``), in this one call; the
  per-step losses must agree within bfloat16 noise. The CPU reference is computed each time
  rather than stored: stored losses would go stale with every change to the model, data order
  or optimizer, and 100 digits steps take about 15 s even on a 2-core CPU (6-8 steps/s there),
  run while the device run goes on.

Each writes one JSON (``--json_out``); ``accelerator.py`` runs each in its own process, with a
time limit, and records a failure instead of stopping.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from absl import app, flags

# The only helpers taken from the other benchmark scripts' module.
from _common import environment, matmul_peak, write_json

FLAGS = flags.FLAGS
flags.DEFINE_string("json_out", "", "write the results here as JSON")
flags.DEFINE_bool("tiny", False, "tiny sizes for a CPU smoke run (CI)")
flags.DEFINE_integer("size", 8192, "matmul: side of the square matmul")
flags.DEFINE_integer("batch", 256, "torch_reference: images per step")
flags.DEFINE_integer("steps", 100, "torch_reference: timed steps; digits_parity: training steps")
# bfloat16 keeps 8 significant bits (relative rounding error up to 2^-8); the device's
# reduced-precision matmuls (TF32 for float32 on GPU) and other reduction orders move each loss
# by a few such units, and the optimizer steps let the two trajectories drift a little further.
flags.DEFINE_float(
    "tolerance", 2.0**-5,
    "digits_parity: largest allowed |device - cpu| / |cpu| of a step's loss (8 bfloat16 units)",
)

ROOT = Path(__file__).resolve().parents[1]


def matmul() -> dict[str, Any]:
    return {
        "size": FLAGS.size,
        "bfloat16_tflops": matmul_peak(FLAGS.size, "bfloat16") / 1e12,
        "float32_tflops": matmul_peak(FLAGS.size, "float32") / 1e12,
        **environment(),
    }


def _import_diffusers_dit():
    import torch  # pylint: disable=g-import-not-at-top

    if not torch.cuda.is_available():
        # The CPU build of torch beside PyPI's torchvision fails registering meta kernels of
        # CUDA-only operators when diffusers imports torchvision; they do not matter on CPU
        # (the same stand-in as tests/conftest.py).
        import types  # pylint: disable=g-import-not-at-top

        sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    from diffusers import DiTTransformer2DModel  # pylint: disable=g-import-not-at-top

    return torch, DiTTransformer2DModel


def torch_reference() -> dict[str, Any]:
    try:
        torch, dit_class = _import_diffusers_dit()
    except ImportError as error:
        return {"skipped": f"torch/diffusers not importable: {error}"}
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if FLAGS.tiny:
        shape = dict(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=2,
                     num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    else:  # DiT-XL/2 on 32x32x4 latents, learned sigma (8 output channels), 1000 classes
        shape = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                     num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
    model = dit_class(**shape).to(device)
    model.train()
    # torch.compile on CPU needs a C++ toolchain and minutes; the tiny run checks the plumbing.
    compiled = torch.compile(model) if cuda else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.0, fused=cuda)
    channels, side = shape["in_channels"], shape["sample_size"]
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(FLAGS.batch, channels, side, side, device=device, generator=generator)
    noise = torch.randn(x.shape, device=device, generator=generator)
    t = torch.randint(0, 1000, (FLAGS.batch,), device=device, generator=generator)
    y = torch.randint(0, shape["num_embeds_ada_norm"], (FLAGS.batch,), device=device, generator=generator)

    def step() -> None:
        # float32 parameters and optimizer state, bfloat16 compute: the JAX step's precision.
        with torch.autocast(device, dtype=torch.bfloat16):
            out = compiled(x + noise, timestep=t, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(out[:, :channels].float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize()

    start = time.perf_counter()
    for _ in range(3):  # compile, then settle autotuning and allocator
        step()
    synchronize()
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
        step()
    synchronize()
    step_s = (time.perf_counter() - start) / FLAGS.steps
    return {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "compiled": cuda,
        "shape": shape,
        "params": sum(p.numel() for p in model.parameters()),
        "batch": FLAGS.batch,
        "warmup_s": warmup_s,
        "step_s": step_s,
        "images_per_s": FLAGS.batch / step_s,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }


def _start_trainer(workdir: Path, env: dict[str, str]) -> subprocess.Popen:
    """``python -m tread_jax.main`` on the digits config, logging every step's loss."""
    steps = FLAGS.steps
    argv = [
        sys.executable, "-m", "tread_jax.main", f"--config={ROOT / 'configs' / 'digits.py'}",
        f"--workdir={workdir}", f"--config.num_train_steps={steps}", f"--config.optim.decay_steps={steps}",
        "--config.log_every=1", f"--config.checkpoint_every={steps}", f"--config.sample.every={steps}",
        "--config.eval.report=",
    ]
    if FLAGS.tiny:
        argv += ["--config.model.overrides.depth=2", "--config.model.overrides.hidden_size=32",
                 "--config.model.overrides.num_heads=2", "--config.routes=((0,1,0.5),)",
                 f"--config.optim.warmup_steps={steps // 2}"]
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _losses(proc: subprocess.Popen, workdir: Path) -> list[float]:
    _, stderr = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"trainer exited {proc.returncode}: {stderr[-2000:]}")
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in sorted(records, key=lambda r: r["step"]) if "loss" in r]


def digits_parity() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"device": dict(os.environ), "cpu": {**os.environ, "JAX_PLATFORMS": "cpu"}}
        # Both at once: the CPU run uses the host's cores while the device run uses the device.
        start = time.perf_counter()
        procs = {name: _start_trainer(Path(tmp) / name, env) for name, env in runs.items()}
        device, cpu = (_losses(procs[name], Path(tmp) / name) for name in runs)
        seconds = time.perf_counter() - start
    if len(device) != FLAGS.steps or len(cpu) != FLAGS.steps:
        raise RuntimeError(f"expected {FLAGS.steps} losses, got {len(device)} (device) and {len(cpu)} (cpu)")
    relative = [abs(d - c) / abs(c) for d, c in zip(device, cpu)]
    worst = max(range(len(relative)), key=relative.__getitem__)
    return {
        "steps": FLAGS.steps,
        "tolerance": FLAGS.tolerance,
        "max_rel_diff": relative[worst],
        "max_rel_diff_step": worst + 1,
        "median_rel_diff": sorted(relative)[len(relative) // 2],
        "agree": relative[worst] <= FLAGS.tolerance,
        "device_losses": device,
        "cpu_losses": cpu,
        "both_runs_s": seconds,
    }


CHECKS = {"matmul": matmul, "torch_reference": torch_reference, "digits_parity": digits_parity}


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in CHECKS:
        raise app.UsageError(f"one check: {', '.join(CHECKS)}")
    result = CHECKS[argv[1]]()
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_losses")}, default=str))
    write_json(FLAGS.json_out, result)


if __name__ == "__main__":
    app.run(main)
