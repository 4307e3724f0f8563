"""One command that measures an accelerator: writes accelerator.json and a markdown table.

    python benchmarks/accelerator.py --out_dir=/tmp/accel            # one GPU or TPU, <= 8 min
    python benchmarks/accelerator.py --out_dir=/tmp/accel --tiny     # tiny sizes on CPU (CI)

Sections, in this order, each in its own process with its own time limit (a section that
fails, runs out of memory or out of time is recorded in the JSON and the next one runs):

1. ``peak``: bfloat16 and float32 matmul peaks, the MFU denominators of the whole run.
2. ``train_B2`` / ``train_XL2``: ``train_step.py``, the trainer's step of DiT-B/2 and DiT-XL/2
   at batch 256 in bfloat16, dense and routed (default route 2..depth-4, ratio 0.5): images/s,
   MFU (analytic model FLOPs, three forwards per image), peak device memory, compile time, the
   routed/dense time ratio beside the analytic FLOP ratio (``tread_jax/models/flops.py``).
3. ``sample_XL2``: ``sampling.py``, the Heun sampler (40 steps, 79 evaluations), DiT-XL/2.
4. ``evaluation``: ``evaluation.py``, FID Inception and SD-VAE decoder throughput (float32).
5. ``digits_parity``: the digits trainer for 100 steps on the device and on the host CPU; the
   losses must agree within bfloat16 noise (``accelerator_checks.py``).
6. ``torch_reference``: diffusers' DiT-XL/2 train step (bf16 autocast, torch.compile), same
   batch, where torch and diffusers are installed (``accelerator_checks.py``).
7. With ``--extended``, if time remains: ``train_XL2_repa``, the DiT-XL/2 routed step without and
   with REPA (DINOv2-B/14 with random weights at 224 px, block 8) alternating, and the encoder
   alone: REPA's measured share of the step beside the analytic one; then the DiT-XL/2 train
   step with ``--scan_blocks`` and with each ``--remat`` policy.

The total stays within ``--budget_s`` (480 s): a section's limit is its own budget or what is
left, whichever is smaller, and a section with under ``MIN_SECTION_S`` left is skipped. The
per-section budgets below are estimates for one H100/H200 (not measured: no accelerator has
run this yet); a section that times out says so in the table.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from absl import app, flags

from accelerator_report import markdown_table

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", "accelerator_results", "where accelerator.json, accelerator.md and accelerator.log go")
flags.DEFINE_bool("tiny", False, "every section at tiny sizes on CPU, in about a minute (CI)")
flags.DEFINE_bool("extended", False, "also scan_blocks and the remat policies, if time remains")
flags.DEFINE_float("budget_s", 480.0, "time limit of the whole run, seconds")
flags.DEFINE_list("only", [], "run only these sections (names as in the JSON); empty = all")

BENCHMARKS = Path(__file__).resolve().parent
MIN_SECTION_S = 10.0

# Full sizes: the paper's models, batch and sampler (docs/method.md).
FULL_TRAIN = ["--batch=256", "--dtype=bfloat16", "--steps=10", "--matmul_size=0"]
FULL_SAMPLE = ["--model=DiT-XL/2", "--batch=64", "--dtype=bfloat16", "--num_steps=40", "--reps=3", "--matmul_size=0"]
FULL_EVAL = ["--batch=64", "--reps=5", "--image_size=256", "--vae_latent_size=32", "--matmul_size=0"]
# Tiny sizes: the smallest model the scripts accept, with a route that fits its 2 blocks.
TINY_MODEL = ["--model=DiT-S/2", "--overrides=depth=2,hidden_size=32,num_heads=2", "--input_size=8",
              "--in_channels=1", "--num_classes=10", "--batch=4"]
TINY_TRAIN = [*TINY_MODEL, "--dtype=bfloat16", "--route=0,1,0.5", "--steps=2", "--matmul_size=0"]
TINY_SAMPLE = [*TINY_MODEL, "--dtype=bfloat16", "--num_steps=3", "--reps=1", "--matmul_size=0"]
TINY_EVAL = ["--batch=1", "--reps=1", "--image_size=32", "--vae_latent_size=2", "--matmul_size=0"]
# REPA's encoder (DINOv2-B/14 at 224 for 32x32 latents) and block (8 for XL); tiny: one ViT-S block.
FULL_REPA = ["--repa_encoder=dinov2-vitb14", "--repa_depth=8"]
TINY_REPA = ["--repa_encoder=dinov2-vits14", "--repa_encoder_overrides=num_hidden_layers=1", "--repa_depth=1"]


@dataclasses.dataclass(frozen=True)
class Section:
    """One measurement: a benchmark script and its flags (the JSON goes to ``--json_out``)."""

    name: str
    script: str
    args: tuple[str, ...]
    budget_s: float


def plan(tiny: bool, extended: bool) -> list[Section]:
    """The sections in the order they run."""
    if tiny:
        models = {"B2": TINY_TRAIN, "XL2": TINY_TRAIN}
        sample, evaluation = TINY_SAMPLE, TINY_EVAL
        peak, parity, torch = ["--size=256"], ["--tiny", "--steps=10"], ["--tiny", "--batch=4", "--steps=2"]
    else:
        models = {"B2": ["--model=DiT-B/2", *FULL_TRAIN], "XL2": ["--model=DiT-XL/2", *FULL_TRAIN]}
        sample, evaluation = FULL_SAMPLE, FULL_EVAL
        peak, parity, torch = ["--size=8192"], ["--steps=100"], ["--batch=256", "--steps=10"]
    sections = [
        Section("peak", "accelerator_checks.py", ("matmul", *peak), 30),
        Section("train_B2", "train_step.py", tuple(models["B2"]), 75),
        Section("train_XL2", "train_step.py", tuple(models["XL2"]), 120),
        Section("sample_XL2", "sampling.py", tuple(sample), 60),
        Section("evaluation", "evaluation.py", tuple(evaluation), 45),
        Section("digits_parity", "accelerator_checks.py", ("digits_parity", *parity), 60),
        Section("torch_reference", "accelerator_checks.py", ("torch_reference", *torch), 90),
    ]
    if extended:
        variants = {"repa": TINY_REPA if tiny else FULL_REPA, "scan": ["--scan_blocks"],
                    "remat_dots": ["--remat=dots"], "remat_full": ["--remat=full"]}
        sections += [Section(f"train_XL2_{name}", "train_step.py", (*models["XL2"], *flags_), 120)
                     for name, flags_ in variants.items()]
    return sections


def run_section(section: Section, limit_s: float, out_dir: Path, env: dict[str, str], log: TextIO) -> dict[str, Any]:
    """Runs one section in its own process group (killed whole at the limit: torch.compile and
    the trainer start workers of their own); returns its record for the JSON."""
    json_out = out_dir / f".{section.name}.json"
    json_out.unlink(missing_ok=True)
    argv = [sys.executable, str(BENCHMARKS / section.script), *section.args, f"--json_out={json_out}"]
    record: dict[str, Any] = {"command": " ".join(argv[1:]), "limit_s": round(limit_s, 1)}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=BENCHMARKS.parent, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=limit_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        timed_out = True
    record["seconds"] = round(time.perf_counter() - start, 1)
    log.write(f"==== {section.name} ({record['command']})\n{output}\n")
    if timed_out:
        record.update(status="timeout", error=f"stopped at its {limit_s:.0f} s limit")
    elif proc.returncode or not json_out.exists():
        lines = [line for line in output.strip().splitlines() if line.strip()]
        record.update(status="failed", error=(lines or ["no output"])[-1][-300:], output_tail=lines[-30:])
    else:
        result = json.loads(json_out.read_text())
        record.update(status="skipped" if "skipped" in result else "ok", result=result)
    json_out.unlink(missing_ok=True)
    return record


def _write_json(out_dir: Path, summary: dict[str, Any], start: float) -> None:
    summary["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    summary["total_s"] = round(time.perf_counter() - start, 1)
    (out_dir / "accelerator.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")


def main(argv: list[str]) -> None:
    del argv
    out_dir = Path(FLAGS.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # Each script is run as `python benchmarks/<name>.py`: the package must be importable.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCHMARKS.parent), env.get("PYTHONPATH")]))
    if FLAGS.tiny:
        env.setdefault("JAX_PLATFORMS", "cpu")
        # Tiny programs compile about twice as fast without LLVM optimisation; CI checks the
        # plumbing here, not speed.
        env.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
    every = plan(FLAGS.tiny, extended=True)
    unknown = set(FLAGS.only) - {s.name for s in every}
    if unknown:
        raise app.UsageError(f"unknown sections {sorted(unknown)}")
    # --only may name an --extended section without --extended.
    sections = [s for s in every if s.name in FLAGS.only] if FLAGS.only else plan(FLAGS.tiny, FLAGS.extended)

    start = time.perf_counter()
    deadline = start + FLAGS.budget_s
    summary: dict[str, Any] = {"tiny": FLAGS.tiny, "budget_s": FLAGS.budget_s, "sections": {}}
    records = summary["sections"]
    with open(out_dir / "accelerator.log", "w", encoding="utf-8") as log:
        for section in sections:
            left = deadline - time.perf_counter()
            if left < MIN_SECTION_S:
                records[section.name] = {"status": "skipped", "error": f"out of time ({left:.0f} s left of the budget)"}
                continue
            records[section.name] = run_section(section, min(section.budget_s, left), out_dir, env, log)
            print(f"{section.name}: {records[section.name]['status']} in {records[section.name]['seconds']} s",
                  flush=True)
            # After every section, so that a run stopped from outside keeps what it measured.
            _write_json(out_dir, summary, start)
    _write_json(out_dir, summary, start)
    table = markdown_table(summary)
    (out_dir / "accelerator.md").write_text(table)
    print(table)


if __name__ == "__main__":
    app.run(main)
