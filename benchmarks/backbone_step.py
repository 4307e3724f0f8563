"""Train-step speed of the digits DiT and the digits SSM, back to back on the same CPU.

    python benchmarks/backbone_step.py [--reps 15] [--steps 5] [--dense]

Both models are built from ``configs/digits.py`` (the default and its ``:ssm`` variant) and
trained as the trainer trains them: EDM loss with the config's route, gradients, an Adam
update, batch 64 of 8x8x1 inputs. Each model's step is compiled first; then the timed
repetitions alternate (DiT, SSM, SSM, DiT, ...) so that load from other processes on a shared
machine hits both alike. Prints steps/s medians and the SSM/DiT speed ratio.

It runs under the trainer's allocator settings (``tread_jax.host_allocator``: it re-executes
itself as the binaries do).

Measured 2026-11-30 on the 2-core CPU (load average 1.4-1.5), defaults: DiT 26.8 steps/s, SSM
13.7, SSM/DiT 0.51 (``--dense``: 21.0, 11.6, 0.55), the SSM being the ``:ssm`` variant as it is
now (expand 1, state 16). The way there, SSM/DiT: 0.18-0.20 with autodiff of the sequential scan;
0.23-0.28 (0.26 idle) after its [batch, N, D] state and written-out gradient; in one run under
load 3-4 with the allocator settings and the scan paths as layout operations, 0.33 at expand 2
and state 16 (the previous variant), 0.44 at state 8, 0.55 at state 4, 0.57 at expand 1 and 0.72
at expand 1 and state 8. The selective scan's state (expand x width x state floats per token and
direction: 4096 at expand 2, state 16) makes each of its elementwise steps 32x wider than the
DiT's 128-wide tokens; the variant halves it with ``expand=1``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tread_jax import diffusion, host_allocator, models, routing

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def digits_config(variant: str | None):
    """``configs/digits.py`` loaded by path (configs are not a package)."""
    spec = importlib.util.spec_from_file_location("digits_config", CONFIGS / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def make_step(variant: str | None, batch: int, dense: bool):
    """``(run, state)``: ``run(state, steps) -> state`` runs ``steps`` jitted train steps."""
    config = digits_config(variant)
    model = models.create_model(
        config.model.name, input_size=8, in_channels=1, num_classes=10, rngs=nnx.Rngs(0),
        remat=config.model.remat, **config.model.overrides,
    )
    graphdef, params = nnx.split(model, nnx.Param)
    routes = () if dense else routing.parse_routes(config.routes)
    objective = diffusion.create_objective(config.diffusion)
    tx = optax.adam(config.optim.learning_rate, b1=config.optim.b1, b2=config.optim.b2)
    num_tokens = model.num_tokens(8, 8)
    images = jax.random.uniform(jax.random.key(1), (batch, 8, 8, 1), minval=-1.0, maxval=1.0)
    labels = jnp.arange(batch) % 10

    def loss_fn(params, key):
        net_model = nnx.merge(graphdef, params)
        plan = routing.draw_plan(
            jax.random.fold_in(key, 1), routes, batch_size=batch, num_tokens=num_tokens,
            keep_order=net_model.keep_order,
        )

        def net(x, noise_labels, class_labels):
            return net_model(x, noise_labels, class_labels, route_plan=plan)

        return objective.loss(net, images, labels, key).mean()

    @jax.jit
    def step(state, key):
        params, opt_state = state
        grads = jax.grad(loss_fn)(params, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def run(state, steps):
        for i in range(steps):
            state = step(state, jax.random.key(i))
        return jax.block_until_ready(state)

    return run, (params, tx.init(params))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions per model")
    parser.add_argument("--steps", type=int, default=5, help="train steps per repetition")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dense", action="store_true", help="no route (both models dense)")
    args = parser.parse_args()

    runs = {}
    for name, variant in (("DiT", None), ("SSM", "ssm")):
        start = time.perf_counter()
        run, state = make_step(variant, args.batch, args.dense)
        state = run(state, 1)  # compile
        runs[name] = [run, state]
        print(f"{name}: compiled in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    times = {name: [] for name in runs}
    for rep in range(args.reps):
        for name in list(runs) if rep % 2 == 0 else list(runs)[::-1]:
            start = time.perf_counter()
            runs[name][1] = runs[name][0](runs[name][1], args.steps)
            times[name].append((time.perf_counter() - start) / args.steps)
    rate = {name: 1.0 / statistics.median(ts) for name, ts in times.items()}
    routed = "dense" if args.dense else "routed as configured"
    print(f"batch {args.batch}, {routed}, median of {args.reps} x {args.steps} steps, alternating:")
    for name, steps_per_s in rate.items():
        print(f"  {name}: {steps_per_s:.2f} steps/s")
    print(f"  SSM / DiT: {rate['SSM'] / rate['DiT']:.2f}")


if __name__ == "__main__":
    host_allocator.reexec_with_reusable_heap()  # as the trainer runs (tread_jax.main)
    main()
