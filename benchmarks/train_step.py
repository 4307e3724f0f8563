"""Train-step benchmark: parameters, forward cost and measured step time, dense vs routed.

Runs the trainer's own step (``tread_jax.train_step.make_train_step``: label dropout, EDM loss,
AdamW, EMA) on a fixed random batch, for the dense model and for the model with one TREAD
route, in one process. Repetitions alternate dense/routed (and swap the order every pair) so
that machine noise hits both alike; the reported ratio is the median over repetitions.

Example (the CPU measurement in benchmarks/README.md):

    python benchmarks/train_step.py --model=DiT-S/2 --overrides=depth=6,hidden_size=256,num_heads=4 \\
        --batch=8 --input_size=32 --in_channels=4 --route=1,4,0.5 --steps=12 --json_out=/tmp/bench.json

With ``--repa_encoder`` the two variants are instead the step without and with REPA (same batch,
route, dtype; ``--route=dense`` for none), and each repetition also times the encoder's forward
alone (a DINOv2 of the named shape with random weights, in the compute dtype, on the batch's
clean images of ``input_size x 8`` pixels, resized to the model's token grid): the measured
share of REPA (time with / without - 1, encoder / step with REPA) beside the analytic one
(``repa.repa_macs``).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
from absl import app, flags
from flax import nnx

from _common import (
    define_model_flags,
    define_output_flags,
    environment,
    forward_macs_xla,
    matmul_peak,
    ModelSetup,
    model_setup,
    parse_overrides,
    peak_memory_bytes,
    route_from_flag,
    write_json,
)
from tread_jax import diffusion, routing, train_state
from tread_jax.data import latents
from tread_jax.diffusion import repa
from tread_jax.model_builder import ModelBuilder
from tread_jax.models.dinov2 import DinoV2
from tread_jax.models.flops import dit_forward_macs
from tread_jax.train_step import REPA_IMAGE_KEY, make_train_step

FLAGS = flags.FLAGS
define_model_flags(route=True)
flags.DEFINE_integer(
    "steps", 10, "timed steps per variant (after one warm-up step each)"
)
flags.DEFINE_string("repa_encoder", "", "a DINOv2 short name (dinov2-vitb14, ...): time the step without and "
                    "with REPA instead of dense and routed; empty = off")
flags.DEFINE_list("repa_encoder_overrides", [], "DinoV2Config fields, e.g. num_hidden_layers=1 (tiny runs; "
                  "not hidden_size: the projector is built for the named encoder's width)")
flags.DEFINE_integer("repa_depth", 8, "config.repa.depth: the aligned block, 1-based (REPA: 8 for XL, 4 for B)")
define_output_flags()


@dataclasses.dataclass(frozen=True)
class Repa:
    """The REPA variant's pieces: its config section, encoder and analytic cost per image."""

    config: ml_collections.ConfigDict
    encode: Any
    weights: Any
    macs: repa.RepaMacs


def repa_setup(setup: ModelSetup, routes: tuple[routing.Route, ...]) -> Repa:
    """``--repa_encoder`` built with random weights for the token grid of ``setup``'s model."""
    abstract = setup.abstract
    grid = FLAGS.input_size // abstract.patch_size
    overrides = parse_overrides(FLAGS.repa_encoder_overrides)
    if "hidden_size" in overrides:
        raise app.UsageError("--repa_encoder_overrides cannot change hidden_size: pick the encoder of that width")
    encoder = dataclasses.replace(repa.encoder_config(FLAGS.repa_encoder), **overrides)
    section = ml_collections.ConfigDict(dict(
        enabled=True, encoder=FLAGS.repa_encoder, depth=FLAGS.repa_depth, coef=repa.COEF,
        projector_width=repa.PROJECTOR_WIDTH, encoder_image_size=grid * encoder.patch_size, encoder_dtype=FLAGS.dtype))
    model = DinoV2(encoder, image_size=section.encoder_image_size, compute_dtype=jnp.dtype(FLAGS.dtype),
                   rngs=nnx.Rngs(0))
    encode, weights = repa.pure_encoder(model)
    macs = repa.repa_macs(section, abstract.hidden_size, abstract.depth, FLAGS.input_size * latents.DOWNSAMPLE,
                          abstract.num_tokens(FLAGS.input_size, FLAGS.input_size), routes, encoder=encoder)
    return Repa(section, encode, weights, macs)


def main(argv: list[str]) -> None:
    del argv
    setup = model_setup()
    config, overrides, info = setup.config, setup.overrides, setup.info
    model, abstract = setup.model, setup.abstract
    route = () if FLAGS.route == "dense" else route_from_flag(FLAGS.route, abstract.depth)
    extra = repa_setup(setup, route) if FLAGS.repa_encoder else None
    # name: (routes, REPA on)
    variants = {"plain": (route, False), "repa": (route, True)} if extra else {"dense": ((), False),
                                                                               "routed": (route, False)}
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
    if extra:  # the clean images, as the latent pipeline hands them out (uint8 RGB)
        side = FLAGS.input_size * latents.DOWNSAMPLE
        batch[REPA_IMAGE_KEY] = jnp.asarray(rng.integers(0, 256, (FLAGS.batch, side, side, 3)), jnp.uint8)

    results: dict[str, dict[str, float]] = {}
    steps, states, step_args = {}, {}, {}
    for name, (routes, with_repa) in variants.items():
        res = results[name] = {}
        builder = model
        if with_repa:
            repa_config = config.copy_and_resolve_references()
            repa_config.repa = extra.config
            builder = ModelBuilder(repa_config, info)
        res["fwd_gmacs_analytic"] = (
            FLAGS.batch
            * dit_forward_macs(abstract, FLAGS.input_size, FLAGS.input_size, routes)
            / 1e9
        )
        # Forward + backward = 3 forwards, plus REPA's encoder, projector and loss.
        res["step_gmacs_analytic"] = 3 * res["fwd_gmacs_analytic"] + (
            FLAGS.batch * extra.macs.total / 1e9 if with_repa else 0.0)
        res["fwd_gmacs_xla"] = forward_macs_xla(builder, FLAGS.batch, routes) / 1e9
        init = jax.jit(lambda builder=builder: train_state.init_train_state(builder.init_params(), tx))
        state = init()
        step_args[name] = (extra.weights,) if with_repa else ()
        step = jax.jit(
            make_train_step(config if not with_repa else repa_config, builder, objective, tx, routes,
                            encoder=extra.encode if with_repa else None),
            donate_argnums=(0,),
        )
        start = time.perf_counter()
        compiled = step.lower(state, batch, *step_args[name]).compile()
        res["compile_s"] = time.perf_counter() - start
        res["step_tflops_xla"] = compiled.cost_analysis()["flops"] / 1e12
        start = time.perf_counter()
        state, _ = compiled(state, batch, *step_args[name])  # warm-up: first-run allocations
        jax.block_until_ready(state)
        res["first_step_s"] = time.perf_counter() - start
        steps[name], states[name] = compiled, state

    timed = list(variants)
    if extra:  # the encoder's forward alone, on the step's images
        encoder = jax.jit(lambda w, pixels: extra.encode(w, repa.images_from_uint8(pixels)))
        encoder = encoder.lower(extra.weights, batch[REPA_IMAGE_KEY]).compile()
        jax.block_until_ready(encoder(extra.weights, batch[REPA_IMAGE_KEY]))
        timed.append("encoder")
    times = {name: [] for name in timed}
    for rep in range(FLAGS.steps):
        for name in timed if rep % 2 == 0 else timed[::-1]:
            start = time.perf_counter()
            if name == "encoder":
                jax.block_until_ready(encoder(extra.weights, batch[REPA_IMAGE_KEY]))
            else:
                state, _ = steps[name](states[name], batch, *step_args[name])
                jax.block_until_ready(state)
                states[name] = state
            times[name].append(time.perf_counter() - start)

    peak = matmul_peak(FLAGS.matmul_size, FLAGS.dtype)  # the peak of the compute dtype
    for name, res in results.items():
        res["step_s_median"] = statistics.median(times[name])
        res["step_s_all"] = times[name]
        res["images_per_s"] = FLAGS.batch / res["step_s_median"]
        res["tokens_per_s"] = (
            res["images_per_s"] * (FLAGS.input_size // abstract.patch_size) ** 2
        )
        # Model FLOPs (analytic): XLA's count of the step includes remat recomputation and
        # counts a scanned block once.
        res["mfu"] = 2 * res["step_gmacs_analytic"] * 1e9 / res["step_s_median"] / peak
    first, second = variants
    pair_ratios = [r / d for r, d in zip(times[second], times[first])]
    flop_ratio = (
        results[second]["step_gmacs_analytic"] / results[first]["step_gmacs_analytic"]
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
        "flop_ratio_xla_fwd": results[second]["fwd_gmacs_xla"]
        / results[first]["fwd_gmacs_xla"],
        "flop_ratio_xla_step": results[second]["step_tflops_xla"]
        / results[first]["step_tflops_xla"],
        "time_ratio_median_of_pairs": time_ratio,
        "time_ratio_of_medians": results[second]["step_s_median"]
        / results[first]["step_s_median"],
        "time_over_flop_ratio": time_ratio / flop_ratio,
        # Both variants ran in this process: the larger one's peak.
        "peak_memory_bytes": peak_memory_bytes(),
        "variants": results,
    }
    if extra:
        encoder_s = statistics.median(times["encoder"])
        summary["repa"] = {
            "encoder": FLAGS.repa_encoder,
            "encoder_overrides": FLAGS.repa_encoder_overrides,
            "encoder_image_size": extra.config.encoder_image_size,
            "depth": FLAGS.repa_depth,
            "encoder_s_median": encoder_s,
            "encoder_s_all": times["encoder"],
            "overhead_measured": time_ratio - 1,
            "overhead_analytic": flop_ratio - 1,
            "encoder_share_measured": encoder_s / results["repa"]["step_s_median"],
            "encoder_share_analytic": FLAGS.batch * extra.macs.encoder / 1e9 / results["repa"]["step_gmacs_analytic"],
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
        f"{second}/{first}: FLOPs {flop_ratio:.3f} (analytic), {summary['flop_ratio_xla_step']:.3f} (XLA step); "
        f"time {time_ratio:.3f} (median of {FLAGS.steps} interleaved pairs); time/FLOP ratio {time_ratio / flop_ratio:.3f}"
    )
    if extra:
        r = summary["repa"]
        print(
            f"REPA ({FLAGS.repa_encoder} at {r['encoder_image_size']} px, depth {r['depth']}): step time "
            f"+{r['overhead_measured']:.1%} measured, +{r['overhead_analytic']:.1%} analytic; encoder alone "
            f"{r['encoder_s_median']:.4f} s = {r['encoder_share_measured']:.1%} of the REPA step measured, "
            f"{r['encoder_share_analytic']:.1%} analytic"
        )
    write_json(FLAGS.json_out, summary)


if __name__ == "__main__":
    app.run(main)
