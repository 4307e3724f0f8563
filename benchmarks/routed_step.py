"""The trainer's digits train step against the minimal plain-JAX reference, dense and routed.

    python benchmarks/routed_step.py [--reps 15] [--steps 5]

Four jitted programs, each one train step per call on the same batch already on the device (the
loop's host work is not in it): the trainer's step (``tread_jax.train_step.make_train_step``
over ``ModelBuilder``, as ``tread_jax.train`` jits it, state donated) and the step of
``minimal_reference.py``, each dense and with ``configs/digits.py``'s route, from the same
initial weights. After compiling, the timed repetitions alternate the programs (rotating the
order) so that load from other processes hits all alike. Prints the steps/s medians, the
trainer/reference time ratios (of the medians, and the median of the ratios within each
repetition, whose programs ran back to back under the same load), each program's routed/dense
time ratio and the analytic FLOP ratio (``tread_jax.models.flops``), the issue's targets.

It runs under the trainer's allocator settings (``tread_jax.host_allocator``: it re-executes itself
as the binaries do); ``host_allocator.py`` compares them with glibc's defaults.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import minimal_reference
from backbone_step import digits_config
from tread_jax import data, diffusion, host_allocator, routing, train_state
from tread_jax.model_builder import ModelBuilder
from tread_jax.models import flops
from tread_jax.train_step import make_train_step

def digits_setup(depth: int | None, width: int | None, heads: int | None,
                 patch: int | None = None) -> tuple[Any, ModelBuilder]:
    """The digits config (optionally resized) and its model, as the trainer builds them."""
    config = digits_config(None)
    sizes = dict(depth=depth, hidden_size=width, num_heads=heads, patch_size=patch)
    config.model.overrides = dict(config.model.overrides, **{k: v for k, v in sizes.items() if v})
    info = data.DatasetInfo(name="digits", image_shape=(8, 8, 1), num_classes=10, num_train=0, num_test=0)
    return config, ModelBuilder(config, info)


def reference_spec(config: Any, model: ModelBuilder, routed: bool) -> minimal_reference.Spec:
    """The reference settings matching ``config`` (the digits config, float32)."""
    net = model.abstract_model
    route = routing.parse_routes(config.routes)[0]
    return minimal_reference.Spec(
        depth=net.depth, width=net.hidden_size, heads=net.blocks[0].num_heads, patch=net.patch_size,
        image=model.image_shape, num_classes=model.num_classes,
        route=(route.start, route.end, route.ratio) if routed else None,
        sigma_data=config.diffusion.sigma_data, p_mean=config.diffusion.P_mean, p_std=config.diffusion.P_std,
        label_dropout=config.label_dropout, learning_rate=config.optim.learning_rate, b1=config.optim.b1,
        b2=config.optim.b2, warmup_steps=config.optim.warmup_steps, ema_decay=config.ema_decay, seed=config.seed,
    )


def programs(config: Any, model: ModelBuilder, batch: dict[str, jax.Array]) -> dict[str, tuple[Callable, Any]]:
    """``name -> (step, state)``: ``step(state) -> state``, jitted with the state donated."""
    params = model.init_params()
    objective = diffusion.create_objective(config.diffusion)
    tx = train_state.create_optimizer(config.optim)
    out = {}
    for routed in (False, True):
        routes = routing.parse_routes(config.routes) if routed else ()
        trainer = jax.jit(make_train_step(config, model, objective, tx, routes), donate_argnums=(0,))
        spec = reference_spec(config, model, routed)
        reference = jax.jit(lambda s, b, spec=spec: minimal_reference.train_step(spec, s, b["image"], b["label"])[0],
                            donate_argnums=(0,))
        copy = lambda: jax.tree.map(jnp.copy, params)
        kind = "routed" if routed else "dense"
        out[f"trainer {kind}"] = (lambda s, f=trainer: f(s, batch)[0], train_state.init_train_state(copy(), tx))
        out[f"reference {kind}"] = (lambda s, f=reference: f(s, batch),
                                    minimal_reference.init_state(minimal_reference.from_tread_params(copy())))
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Steps/s medians of the four programs, their ratios and the FLOP ratio."""
    config, model = digits_setup(args.depth, args.width, args.heads, args.patch)
    key_images, key_labels = jax.random.split(jax.random.key(1))
    batch = {"image": jax.random.uniform(key_images, (args.batch, 8, 8, 1), minval=-1.0, maxval=1.0),
             "label": jax.random.randint(key_labels, (args.batch,), 0, 10)}
    runs = programs(config, model, batch)
    states = {}
    for name, (step, state) in runs.items():
        states[name] = jax.block_until_ready(step(state))  # compile
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            step, state = runs[name][0], states[name]
            start = time.perf_counter()
            for _ in range(args.steps):
                state = step(state)
            states[name] = jax.block_until_ready(state)
            times[name].append((time.perf_counter() - start) / args.steps)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    paired = {kind: statistics.median(t / r for t, r in zip(times[f"trainer {kind}"], times[f"reference {kind}"]))
              for kind in ("routed", "dense")}
    net, routes = model.abstract_model, routing.parse_routes(config.routes)
    return {
        "steps_per_s": {name: 1.0 / t for name, t in median.items()},
        "trainer/reference time, routed": median["trainer routed"] / median["reference routed"],
        "trainer/reference time, dense": median["trainer dense"] / median["reference dense"],
        "trainer/reference, routed, paired": paired["routed"],
        "trainer/reference, dense, paired": paired["dense"],
        "routed/dense time, trainer": median["trainer routed"] / median["trainer dense"],
        "routed/dense time, reference": median["reference routed"] / median["reference dense"],
        "routed/dense FLOPs": flops.dit_forward_macs(net, 8, 8, routes) / flops.dit_forward_macs(net, 8, 8),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions per program")
    parser.add_argument("--steps", type=int, default=5, help="train steps per repetition")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--depth", type=int, help="resize the digits model (tests)")
    parser.add_argument("--width", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--patch", type=int, help="patch size (1: 64 tokens per digit instead of 16)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line")
    args = parser.parse_args()
    result = measure(args)
    if args.json:
        print(json.dumps(result))
        return
    print(f"batch {args.batch}, median of {args.reps} x {args.steps} steps, alternating:")
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"  {key}:")
            for name, v in value.items():
                print(f"    {name:18} {v:.2f}")
        else:
            print(f"  {key:32} {value:.3f}")


if __name__ == "__main__":
    host_allocator.reexec_with_reusable_heap()  # as the trainer runs (tread_jax.main)
    main()
