"""Train-step benchmark: parameters, forward cost and measured step time, dense vs routed.

Runs the trainer's own step (``tread_jax.train_step.make_train_step``: label dropout, EDM loss,
AdamW, EMA) on a fixed random batch, for the dense model and for the model with one TREAD
route, in one process. Repetitions alternate dense/routed (and swap the order every pair) so
that machine noise hits both alike; the reported ratio is the median over repetitions.

Example (the CPU measurement in benchmarks/README.md):

    python benchmarks/train_step.py --model=DiT-S/2 --overrides=depth=6,hidden_size=256,num_heads=4 \\
        --batch=8 --input_size=32 --in_channels=4 --route=1,4,0.5 --steps=12 --json_out=/tmp/bench.json
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from _common import (
    define_model_flags,
    define_output_flags,
    environment,
    forward_macs_xla,
    matmul_peak,
    model_setup,
    peak_memory_bytes,
    route_from_flag,
    write_json,
)
from tread_jax import diffusion, train_state
from tread_jax.models.flops import dit_forward_macs
from tread_jax.train_step import make_train_step

FLAGS = flags.FLAGS
define_model_flags(route=True)
flags.DEFINE_integer(
    "steps", 10, "timed steps per variant (after one warm-up step each)"
)
define_output_flags()


def main(argv: list[str]) -> None:
    del argv
    setup = model_setup()
    config, overrides, info = setup.config, setup.overrides, setup.info
    model, abstract = setup.model, setup.abstract
    route = route_from_flag(FLAGS.route, abstract.depth)
    variants = {"dense": (), "routed": route}
    num_params = setup.num_params
    objective = diffusion.create_objective(config.diffusion)
    tx = train_state.create_optimizer(config.optim)
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(
            rng.standard_normal((FLAGS.batch, *info.image_shape)), jnp.float32
        ),
        "label": jnp.asarray(
            rng.integers(0, FLAGS.num_classes, FLAGS.batch), jnp.int32
        ),
    }
    init = jax.jit(lambda: train_state.init_train_state(model.init_params(), tx))

    results: dict[str, dict[str, float]] = {}
    steps, states = {}, {}
    for name, routes in variants.items():
        res = results[name] = {}
        res["fwd_gmacs_analytic"] = (
            FLAGS.batch
            * dit_forward_macs(abstract, FLAGS.input_size, FLAGS.input_size, routes)
            / 1e9
        )
        res["fwd_gmacs_xla"] = forward_macs_xla(model, FLAGS.batch, routes) / 1e9
        state = init()
        step = jax.jit(
            make_train_step(config, model, objective, tx, routes),
            donate_argnums=(0,),
        )
        start = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        res["compile_s"] = time.perf_counter() - start
        res["step_tflops_xla"] = compiled.cost_analysis()["flops"] / 1e12
        start = time.perf_counter()
        state, _ = compiled(state, batch)  # warm-up: first-run allocations
        jax.block_until_ready(state)
        res["first_step_s"] = time.perf_counter() - start
        steps[name], states[name] = compiled, state

    times = {name: [] for name in variants}
    order = list(variants)
    for rep in range(FLAGS.steps):
        for name in order if rep % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            state, _ = steps[name](states[name], batch)
            jax.block_until_ready(state)
            times[name].append(time.perf_counter() - start)
            states[name] = state

    peak = matmul_peak(FLAGS.matmul_size, FLAGS.dtype)  # the peak of the compute dtype
    for name, res in results.items():
        res["step_s_median"] = statistics.median(times[name])
        res["step_s_all"] = times[name]
        res["images_per_s"] = FLAGS.batch / res["step_s_median"]
        res["tokens_per_s"] = (
            res["images_per_s"] * (FLAGS.input_size // abstract.patch_size) ** 2
        )
        # Model FLOPs (forward + backward = 3 forwards, analytic): XLA's count of the step
        # includes remat recomputation and counts a scanned block once.
        model_flops = 3 * 2 * res["fwd_gmacs_analytic"] * 1e9
        res["mfu"] = model_flops / res["step_s_median"] / peak
    pair_ratios = [r / d for r, d in zip(times["routed"], times["dense"])]
    flop_ratio = (
        results["routed"]["fwd_gmacs_analytic"] / results["dense"]["fwd_gmacs_analytic"]
    )
    time_ratio = statistics.median(pair_ratios)
    summary = {
        "model": FLAGS.model,
        "overrides": overrides,
        "batch": FLAGS.batch,
        "input_size": FLAGS.input_size,
        "in_channels": FLAGS.in_channels,
        "dtype": FLAGS.dtype,
        "route": [vars(r) for r in route],
        "params": num_params,
        **environment(),
        "matmul_peak_tflops": peak / 1e12,
        "flop_ratio_analytic": flop_ratio,
        "flop_ratio_xla_fwd": results["routed"]["fwd_gmacs_xla"]
        / results["dense"]["fwd_gmacs_xla"],
        "flop_ratio_xla_step": results["routed"]["step_tflops_xla"]
        / results["dense"]["step_tflops_xla"],
        "time_ratio_median_of_pairs": time_ratio,
        "time_ratio_of_medians": results["routed"]["step_s_median"]
        / results["dense"]["step_s_median"],
        "time_over_flop_ratio": time_ratio / flop_ratio,
        # Both variants ran in this process: the larger one's peak (the dense step's).
        "peak_memory_bytes": peak_memory_bytes(),
        "variants": results,
    }

    print(
        f"{FLAGS.model} {overrides} batch {FLAGS.batch} {FLAGS.input_size}x{FLAGS.input_size}x{FLAGS.in_channels} "
        f"{FLAGS.dtype}, route {route}, {num_params / 1e6:.2f}M params, {summary['device']}, "
        f"matmul peak {peak / 1e9:.1f} GFLOP/s"
    )
    header = f"{'':8}{'fwd GMACs xla':>14}{'fwd GMACs ana':>14}{'step TFLOP':>11}{'compile s':>10}{'step s':>9}{'img/s':>8}{'MFU':>7}"
    print(header)
    for name, r in results.items():
        print(
            f"{name:8}{r['fwd_gmacs_xla']:14.3f}{r['fwd_gmacs_analytic']:14.3f}{r['step_tflops_xla']:11.4f}"
            f"{r['compile_s']:10.1f}{r['step_s_median']:9.4f}{r['images_per_s']:8.1f}{r['mfu']:7.1%}"
        )
    print(
        f"routed/dense: FLOPs {flop_ratio:.3f} (analytic), {summary['flop_ratio_xla_step']:.3f} (XLA step); "
        f"time {time_ratio:.3f} (median of {FLAGS.steps} interleaved pairs); time/FLOP ratio {time_ratio / flop_ratio:.3f}"
    )
    write_json(FLAGS.json_out, summary)


if __name__ == "__main__":
    app.run(main)
