"""Train-step benchmark: parameters, forward cost and measured step time, dense vs routed.

Runs the trainer's own step (``tread_jax.train.make_train_step``: label dropout, EDM loss,
AdamW, EMA) on a fixed random batch, for the dense model and for the model with one TREAD
route, in one process. Repetitions alternate dense/routed (and swap the order every pair) so
that machine noise hits both alike; the reported ratio is the median over repetitions.

Example (the CPU measurement in benchmarks/README.md):

    python benchmarks/train_step.py --model=DiT-S/2 --overrides=depth=6,hidden_size=256,num_heads=4 \\
        --batch=8 --input_size=32 --in_channels=4 --route=1,4,0.5 --steps=12 --json_out=/tmp/bench.json
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from tread_jax import data, diffusion, routing, train, train_state
from tread_jax.models.flops import dit_forward_macs

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "DiT-S/2", "registry name")
flags.DEFINE_list(
    "overrides",
    [],
    "size overrides key=value, e.g. depth=6,hidden_size=256,num_heads=4",
)
flags.DEFINE_integer("batch", 8, "global batch size")
flags.DEFINE_integer("input_size", 32, "latent/image side")
flags.DEFINE_integer("in_channels", 4, "latent/image channels")
flags.DEFINE_integer(
    "num_classes", 1000, "classes (the label table gets one more, the null class)"
)
flags.DEFINE_string(
    "route", "", "start,end,ratio; empty = DESIGN default 2,depth-4,0.5"
)
flags.DEFINE_enum(
    "dtype",
    "float32",
    ["float32", "bfloat16"],
    "compute dtype (parameters stay float32)",
)
flags.DEFINE_integer(
    "steps", 10, "timed steps per variant (after one warm-up step each)"
)
flags.DEFINE_integer(
    "matmul_size",
    2048,
    "side of the square float32 matmul that measures peak; 0 = skip",
)
flags.DEFINE_string("json_out", "", "also write the results here as JSON")


def _config(model_overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """The training config fields the step reads, at DESIGN.md defaults (AdamW 1e-4, EMA 0.9999)."""
    return ml_collections.ConfigDict(
        {
            "seed": 0,
            "model": {
                "name": FLAGS.model,
                "overrides": model_overrides,
                "compute_dtype": FLAGS.dtype,
            },
            "route_loss": {"enabled": False, "mae_coef": 0.0},
            "diffusion": diffusion.default_config("edm"),
            "label_dropout": 0.1,
            "optim": {
                "learning_rate": 1e-4,
                "b1": 0.9,
                "b2": 0.999,
                "eps": 1e-8,
                "weight_decay": 0.0,
                "warmup_steps": 0,
                "grad_clip": 0.0,
            },
            "ema_decay": 0.9999,
        }
    )


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--overrides item {item!r} is not key=value")
        out[key] = float(value) if "." in value else int(value)
    return out


def _forward_macs_xla(parts, batch: int, routes) -> float:
    """Forward MACs from XLA's cost analysis of the lowered (uncompiled) forward program."""
    size, channels = FLAGS.input_size, FLAGS.in_channels
    _, params, rest = flax.nnx.split(
        flax.nnx.eval_shape(lambda: parts.build(flax.nnx.Rngs(0))), flax.nnx.Param, ...
    )

    def forward(params, x, t, y, key):
        return parts.merge(params, rest)(x, t, y, routes=routes, route_key=key)

    lowered = jax.jit(forward).lower(
        params,
        jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
        jax.random.key(0),
    )
    return lowered.cost_analysis()["flops"] / 2


def _matmul_peak(n: int, reps: int = 5) -> float:
    """Best float32 FLOP/s of an n x n matmul on the default device (the MFU denominator)."""
    a = jax.random.normal(jax.random.key(0), (n, n))
    matmul = jax.jit(lambda a: a @ a)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def main(argv: list[str]) -> None:
    del argv
    overrides = _parse_overrides(FLAGS.overrides)
    config = _config(overrides)
    info = data.DatasetInfo(
        name="random",
        image_shape=(FLAGS.input_size, FLAGS.input_size, FLAGS.in_channels),
        num_classes=FLAGS.num_classes,
        num_train=0,
        num_test=0,
    )
    parts = train.ModelParts(config, info)
    abstract = flax.nnx.eval_shape(lambda: parts.build(flax.nnx.Rngs(0)))
    depth = abstract.depth
    spec = FLAGS.route.split(",") if FLAGS.route else (2, depth - 4, 0.5)
    route = routing.validate_routes(routing.parse_routes([spec]), depth)
    variants = {"dense": (), "routed": route}

    num_params = sum(
        p.size for p in jax.tree.leaves(flax.nnx.state(abstract, flax.nnx.Param))
    )
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
    init = jax.jit(
        lambda: (train_state.init_train_state(parts.init()[0], tx), parts.init()[1])
    )

    results: dict[str, dict[str, float]] = {}
    steps, states = {}, {}
    for name, routes in variants.items():
        res = results[name] = {}
        res["fwd_gmacs_analytic"] = (
            FLAGS.batch
            * dit_forward_macs(abstract, FLAGS.input_size, FLAGS.input_size, routes)
            / 1e9
        )
        res["fwd_gmacs_xla"] = _forward_macs_xla(parts, FLAGS.batch, routes) / 1e9
        state, rest = init()
        step = jax.jit(
            train.make_train_step(config, parts, objective, tx, routes),
            donate_argnums=(0,),
        )
        start = time.perf_counter()
        compiled = step.lower(state, batch, rest).compile()
        res["compile_s"] = time.perf_counter() - start
        res["step_tflops_xla"] = compiled.cost_analysis()["flops"] / 1e12
        start = time.perf_counter()
        state, _ = compiled(state, batch, rest)  # warm-up: first-run allocations
        jax.block_until_ready(state)
        res["first_step_s"] = time.perf_counter() - start
        steps[name], states[name] = compiled, (state, rest)

    times = {name: [] for name in variants}
    order = list(variants)
    for rep in range(FLAGS.steps):
        for name in order if rep % 2 == 0 else order[::-1]:
            state, rest = states[name]
            start = time.perf_counter()
            state, _ = steps[name](state, batch, rest)
            jax.block_until_ready(state)
            times[name].append(time.perf_counter() - start)
            states[name] = (state, rest)

    peak = _matmul_peak(FLAGS.matmul_size) if FLAGS.matmul_size else float("nan")
    for name, res in results.items():
        res["step_s_median"] = statistics.median(times[name])
        res["step_s_all"] = times[name]
        res["images_per_s"] = FLAGS.batch / res["step_s_median"]
        res["tokens_per_s"] = (
            res["images_per_s"] * (FLAGS.input_size // abstract.patch_size) ** 2
        )
        res["mfu"] = res["step_tflops_xla"] * 1e12 / res["step_s_median"] / peak
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
        "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
        "platform": platform.platform(),
        "jax": jax.__version__,
        "flax": flax.__version__,
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
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    app.run(main)
