"""Compile time of the trainer's train step, dense and routed, from abstract shapes only.

The step is ``tread_jax.train_step.make_train_step`` (label dropout, EDM loss, AdamW, EMA) jitted
with the state donated, as in ``benchmarks/train_step.py``. Nothing is initialised: the state,
batch and model state are ``jax.ShapeDtypeStruct``s from ``jax.eval_shape``, so a DiT-XL/2 step
compiles on a laptop. Trace (Python -> jaxpr), lower (jaxpr -> StableHLO) and compile (XLA)
are timed separately; issue 7's target is DiT-XL/2 under 60 s on CPU. ``--scan_blocks`` and
``--remat`` set the trainer's ``config.model`` options of the same names. XLA's buffer sizes
(arguments, outputs, temporaries) show whether a batch fits a device before trying it there.

    python benchmarks/compile_time.py --model=DiT-XL/2 --batch=32 --json_out=/tmp/compile.json
    python benchmarks/compile_time.py --model=DiT-XL/2 --overrides=depth=7 --variants=dense
    python benchmarks/compile_time.py --model=DiT-XL/2 --scan_blocks --remat=dots
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags

from _common import (
    define_model_flags,
    environment,
    model_setup,
    route_from_flag,
    write_json,
)
from tread_jax import diffusion, train_state
from tread_jax.train_step import make_train_step

FLAGS = flags.FLAGS
define_model_flags(model="DiT-XL/2", batch=32, route=True)
flags.DEFINE_list("variants", ["dense", "routed"], "which steps to compile: dense, routed")
flags.DEFINE_string("json_out", "", "also write the results here as JSON")


def _memory(compiled: Any) -> dict[str, int]:
    """XLA's buffer sizes for the compiled step (argument, output, temporary), where reported."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    return {f: int(getattr(analysis, f)) for f in fields if hasattr(analysis, f)}


def main(argv: list[str]) -> None:
    del argv
    unknown = sorted(set(FLAGS.variants) - {"dense", "routed"})
    if unknown or not FLAGS.variants:
        raise ValueError(f"--variants must name dense and/or routed, got {FLAGS.variants}")
    setup = model_setup()
    config, model = setup.config, setup.model
    route = route_from_flag(FLAGS.route, setup.abstract.depth)
    objective = diffusion.create_objective(config.diffusion)
    tx = train_state.create_optimizer(config.optim)

    def init() -> train_state.TrainState:
        return train_state.init_train_state(model.init_params(), tx)

    start = time.perf_counter()
    state = jax.eval_shape(init)
    abstract_s = time.perf_counter() - start
    batch = {
        "image": jax.ShapeDtypeStruct((FLAGS.batch, *setup.info.image_shape), jnp.float32),
        "label": jax.ShapeDtypeStruct((FLAGS.batch,), jnp.int32),
    }

    results: dict[str, dict[str, Any]] = {}
    for name in FLAGS.variants:
        routes = route if name == "routed" else ()
        step = jax.jit(
            make_train_step(config, model, objective, tx, routes), donate_argnums=(0,)
        )
        res = results[name] = {}
        start = time.perf_counter()
        traced = step.trace(state, batch)
        res["trace_s"] = time.perf_counter() - start
        start = time.perf_counter()
        lowered = traced.lower()
        res["lower_s"] = time.perf_counter() - start
        res["hlo_chars"] = len(lowered.as_text())
        start = time.perf_counter()
        compiled = lowered.compile()
        res["compile_s"] = time.perf_counter() - start
        res["total_s"] = res["trace_s"] + res["lower_s"] + res["compile_s"]
        # XLA counts a loop body once: a scanned model's count would cover one block per stretch.
        flops = None if config.model.scan_blocks else compiled.cost_analysis()["flops"]
        res["step_tflops_xla"] = None if flops is None else flops / 1e12
        res.update(_memory(compiled))

    summary = {
        "model": FLAGS.model,
        "overrides": setup.overrides,
        "depth": setup.abstract.depth,
        "batch": FLAGS.batch,
        "input_size": FLAGS.input_size,
        "in_channels": FLAGS.in_channels,
        "dtype": FLAGS.dtype,
        "scan_blocks": FLAGS.scan_blocks,
        "remat": FLAGS.remat,
        "route": [vars(r) for r in route],
        "params": setup.num_params,
        "abstract_state_s": abstract_s,
        **environment(),
        "variants": results,
    }
    print(
        f"{FLAGS.model} {setup.overrides} depth {setup.abstract.depth}, scan_blocks {FLAGS.scan_blocks}, "
        f"remat {FLAGS.remat}, batch {FLAGS.batch} "
        f"{FLAGS.input_size}x{FLAGS.input_size}x{FLAGS.in_channels} {FLAGS.dtype}, route {route}, "
        f"{setup.num_params / 1e6:.2f}M params, {summary['device']}, "
        f"load average {' '.join(f'{v:.1f}' for v in summary['load_average'])}"
    )
    print(f"{'':8}{'trace s':>9}{'lower s':>9}{'compile s':>11}{'total s':>9}{'step TFLOP':>12}")
    for name, r in results.items():
        tflops = "n/a (scan)" if r["step_tflops_xla"] is None else f"{r['step_tflops_xla']:.4f}"
        print(
            f"{name:8}{r['trace_s']:9.2f}{r['lower_s']:9.2f}{r['compile_s']:11.2f}{r['total_s']:9.2f}"
            f"{tflops:>12}"
        )
    write_json(FLAGS.json_out, summary)


if __name__ == "__main__":
    app.run(main)
