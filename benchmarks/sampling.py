"""Sampling benchmark: the EDM Heun sampler exactly as the trainer builds it, images/s and MFU.

The sampler is ``tread_jax.sampler.Sampler`` (dense, one jitted program, a ``fori_loop``
over the Heun steps; ``num_steps`` N costs 2N - 1 network evaluations, 79 at the default 40).
Guidance > 1 runs classifier-free guidance: every evaluation is one network call on the doubled
(conditional + null-class) batch. Timed calls include the copy of the images to the host, as
in the trainer.

Model FLOPs per image are given twice: analytic (``tread_jax.models.flops.dit_forward_macs``,
matmuls only) and from XLA's cost analysis of one network evaluation, each times the
evaluations. XLA's cost analysis of the whole sampler program counts the ``fori_loop`` body
once (checked in every run: ``xla_sampler_evals_counted`` is the number of evaluations the
whole-program count amounts to, 3 = loop body (2) + final step (1)), so it cannot give the
per-image cost directly. For the same reason the per-evaluation count of a ``--scan_blocks``
model is taken from the unrolled model (the same computation).

    python benchmarks/sampling.py --model=DiT-S/2 --overrides=depth=6,hidden_size=128,num_heads=4 \\
        --input_size=8 --in_channels=1 --num_classes=10 --batch=64 --num_steps=18 --guidance=1.5

``--compare_guidance`` prints, instead of sampling, the analytic FLOPs per image (matmuls,
``dit_forward_macs``) of the guidance methods side by side: none, classifier-free (two dense
passes per evaluation), Sparse Guidance (a pass routed at each of ``--sparsity`` = weak,strong
over ``--route``'s blocks, default the published TREAD placement 2..depth-4) and SPRINT's
path-drop guidance (a dense pass of the model with a SPRINT span, ``--route``'s blocks or the
published 2..depth-3, plus one that skips the span):

    python benchmarks/sampling.py --model=DiT-XL/2 --num_steps=40 --compare_guidance --sparsity=0.75,0.0
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from _common import (
    ModelSetup,
    define_model_flags,
    define_output_flags,
    environment,
    forward_macs_xla,
    matmul_peak,
    model_setup,
    peak_memory_bytes,
    route_from_flag,
    unscanned_model,
    write_json,
)
from tread_jax import diffusion, routing, sharding
from tread_jax.model_builder import ModelBuilder
from tread_jax.models.flops import dit_forward_macs
from tread_jax.sampler import Sampler

FLAGS = flags.FLAGS
define_model_flags(route=True)
flags.DEFINE_integer("num_steps", 40, "Heun steps N (2N - 1 network evaluations)")
flags.DEFINE_float("guidance", 1.0, "classifier-free guidance scale; 1 = conditional only")
flags.DEFINE_integer("reps", 5, "timed sampler calls (after the compiling first call)")
flags.DEFINE_bool("compare_guidance", False, "print analytic FLOPs per image of each guidance method; no sampling")
flags.DEFINE_list("sparsity", ["0.75", "0.0"], "Sparse Guidance's weak,strong routed fractions")
define_output_flags()


def guidance_gflops_per_image(setup: ModelSetup, evaluations: int, weak: float, strong: float) -> dict[str, float]:
    """Analytic GFLOPs (2 x MACs) per image of ``evaluations`` network evaluations per method."""
    height, width, _ = setup.info.image_shape
    depth = setup.abstract.depth
    placement = route_from_flag(FLAGS.route, depth)[0]
    # The SPRINT span: --route's blocks, else the published 2..depth-3.
    span = (placement.start, placement.end) if FLAGS.route else (2, depth - 3)
    config = setup.config.copy_and_resolve_references()
    config.routes = ({"start": span[0], "end": span[1], "ratio": 0.0, "rejoin": "sprint"},)
    sprint = ModelBuilder(config, setup.info).abstract_model
    at = lambda ratio: dit_forward_macs(setup.abstract, height, width, (routing.Route(placement.start,
                                                                                      placement.end, ratio),))
    macs = {
        "none": dit_forward_macs(setup.abstract, height, width),
        "cfg": 2 * dit_forward_macs(setup.abstract, height, width),
        f"sparse_{weak:g}_{strong:g}": at(weak) + at(strong),
        "path_drop": dit_forward_macs(sprint, height, width) + dit_forward_macs(sprint, height, width,
                                                                                skip_fused=True),
    }
    return {name: 2 * m * evaluations / 1e9 for name, m in macs.items()}


def compare_guidance(setup: ModelSetup) -> None:
    """``--compare_guidance``: the FLOPs table, printed and written as JSON."""
    weak, strong = (float(v) for v in FLAGS.sparsity)
    evaluations = 2 * FLAGS.num_steps - 1
    table = guidance_gflops_per_image(setup, evaluations, weak, strong)
    print(f"{FLAGS.model} {setup.overrides} {FLAGS.input_size}x{FLAGS.input_size}x{FLAGS.in_channels}, EDM Heun "
          f"{FLAGS.num_steps} steps ({evaluations} evaluations); analytic GFLOPs per image (matmuls):")
    for name, gflops in table.items():
        print(f"{name:>24}{gflops:12.4g}{gflops / table['cfg']:8.3f} of CFG")
    write_json(FLAGS.json_out, {"model": FLAGS.model, "overrides": setup.overrides, "num_steps": FLAGS.num_steps,
                                "evaluations_per_image": evaluations, "gflops_per_image": table})


def _sampler_evals_counted_by_xla(
    setup: ModelSetup,
    objective: diffusion.Objective,
    guide: diffusion.Guidance | None,
    per_eval_flops: float,
) -> float:
    """Whole-sampler XLA FLOPs over one evaluation's: how many evaluations XLA's count covers.

    Lowers the program ``Sampler`` jits (the model's ``objective.sample``) from
    abstract shapes; no compile.
    """
    model = setup.model

    def program(params, noise, labels):
        return objective.sample(model.bind(params), noise, labels, num_steps=FLAGS.num_steps, guidance=guide)

    lowered = jax.jit(program).lower(
        model.abstract_params(),
        jax.ShapeDtypeStruct((FLAGS.batch, *model.image_shape), jnp.float32),
        jax.ShapeDtypeStruct((FLAGS.batch,), jnp.int32),
    )
    return lowered.cost_analysis()["flops"] / per_eval_flops


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.num_steps < 2 or FLAGS.reps < 1 or FLAGS.guidance < 1.0:
        raise ValueError("need --num_steps >= 2, --reps >= 1 and --guidance >= 1")
    setup = model_setup()
    if FLAGS.compare_guidance:
        compare_guidance(setup)
        return
    config, model = setup.config, setup.model
    if config.diffusion.name != "edm":
        raise ValueError("this benchmark counts evaluations of the EDM Heun sampler only")
    objective = diffusion.create_objective(config.diffusion)
    mesh = sharding.create_mesh(config.mesh)
    guided = FLAGS.guidance != 1.0
    # The guide the Sampler builds, for the whole-program cost check.
    guide = diffusion.Guidance(scale=FLAGS.guidance, null_class=model.num_classes) if guided else None

    evals = 2 * FLAGS.num_steps - 1  # Heun steps, the last one Euler (EDM Algorithm 1)
    passes = evals * (2 if guided else 1)  # the guided batch is twice the size
    height, width, _ = setup.info.image_shape
    flops_analytic = 2 * dit_forward_macs(setup.abstract, height, width) * passes
    net_batch = FLAGS.batch * (2 if guided else 1)
    # One evaluation, whole batch.
    eval_flops_xla = 2 * forward_macs_xla(unscanned_model(setup), net_batch, ())
    flops_xla = eval_flops_xla * evals / FLAGS.batch
    evals_counted = _sampler_evals_counted_by_xla(setup, objective, guide, eval_flops_xla)

    params = jax.jit(model.init_params, out_shardings=sharding.replicated(mesh))()
    sampler = Sampler(config, model, mesh, sharding.replicated(mesh), num_steps=FLAGS.num_steps,
                      guidance_scale=FLAGS.guidance, name="benchmark")
    labels = np.random.default_rng(0).integers(0, FLAGS.num_classes, FLAGS.batch)
    start = time.perf_counter()
    images = sampler.sample(params, labels, seed=0)  # compiles, then runs once
    first_s = time.perf_counter() - start
    if not np.all(np.isfinite(images)):
        raise FloatingPointError("the sampler produced non-finite images")
    times = []
    for rep in range(FLAGS.reps):
        start = time.perf_counter()
        sampler.sample(params, labels, seed=rep + 1)
        times.append(time.perf_counter() - start)
    batch_s = statistics.median(times)
    peak = matmul_peak(FLAGS.matmul_size, FLAGS.dtype)
    images_per_s = FLAGS.batch / batch_s

    summary = {
        "model": FLAGS.model,
        "overrides": setup.overrides,
        "batch": FLAGS.batch,
        "input_size": FLAGS.input_size,
        "in_channels": FLAGS.in_channels,
        "dtype": FLAGS.dtype,
        "params": setup.num_params,
        "num_steps": FLAGS.num_steps,
        "guidance": FLAGS.guidance,
        **environment(),
        "matmul_peak_tflops": peak / 1e12,
        "evaluations_per_image": evals,
        "forward_passes_per_image": passes,
        "gflops_per_image_analytic": flops_analytic / 1e9,
        "gflops_per_image_xla": flops_xla / 1e9,
        "xla_sampler_evals_counted": evals_counted,
        # Compile time: the first call (compile + one run) less a steady-state call.
        "compile_s": first_s - batch_s,
        "first_call_s": first_s,
        "batch_s_median": batch_s,
        "batch_s_all": times,
        "images_per_s": images_per_s,
        "mfu_xla": flops_xla * images_per_s / peak,
        "mfu_analytic": flops_analytic * images_per_s / peak,
        "peak_memory_bytes": peak_memory_bytes(),
    }
    print(
        f"{FLAGS.model} {setup.overrides} batch {FLAGS.batch} {FLAGS.input_size}x{FLAGS.input_size}x"
        f"{FLAGS.in_channels} {FLAGS.dtype}, {setup.num_params / 1e6:.2f}M params, {summary['device']}, "
        f"matmul peak {peak / 1e9:.1f} GFLOP/s, load average "
        f"{' '.join(f'{v:.1f}' for v in summary['load_average'])}"
    )
    print(
        f"EDM Heun {FLAGS.num_steps} steps, guidance {FLAGS.guidance}: {evals} evaluations/image "
        f"({passes} forward passes); XLA's whole-sampler count covers {evals_counted:.2f} evaluations "
        "(loop body counted once)"
    )
    print(f"{'compile s':>10}{'batch s':>10}{'img/s':>10}{'GFLOP/img ana':>15}{'GFLOP/img xla':>15}{'MFU ana':>9}{'MFU xla':>9}")
    print(
        f"{summary['compile_s']:10.1f}{batch_s:10.3f}{images_per_s:10.1f}{flops_analytic / 1e9:15.3f}"
        f"{flops_xla / 1e9:15.3f}{summary['mfu_analytic']:9.1%}{summary['mfu_xla']:9.1%}"
    )
    write_json(FLAGS.json_out, summary)


if __name__ == "__main__":
    app.run(main)
