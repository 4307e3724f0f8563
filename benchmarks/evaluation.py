"""Evaluation benchmark: FID Inception throughput (and optionally the VAE decoder), images/s and MFU.

The Inception is ``tread_jax.metrics.inception.InceptionV3`` (the network always runs at
299x299: inputs of any ``--image_size`` are resized first, as in FID evaluation) with random
weights: speed does not depend on the values, and the released weights cannot be downloaded
here. ``--vae_latent_size`` > 0 also times the SD-VAE decoder (``tread_jax.vae``, the
sd-vae-ft-ema architecture, random weights) on latents of that side (8x larger images), as the
latent models' sample grids and evaluation use it. FLOPs come from XLA's cost analysis.

    python benchmarks/evaluation.py --batch=16 --reps=5
    python benchmarks/evaluation.py --batch=16 --image_size=256 --vae_latent_size=32
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from _common import define_output_flags, environment, matmul_peak, peak_memory_bytes, write_json
from tread_jax import vae
from tread_jax.metrics import inception

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 16, "images per call")
flags.DEFINE_integer("reps", 5, "timed calls per network (after one warm-up call)")
flags.DEFINE_integer(
    "image_size", inception.INPUT_SIZE, "side of the input images (resized to 299 inside)"
)
flags.DEFINE_integer("vae_latent_size", 0, "latent side for the VAE decoder; 0 = skip it")
define_output_flags()


def _random_like(state: Any, seed: int) -> Any:
    """Uniform random float32 values in [-0.05, 0.05) in the shapes of ``state``.

    Built on the host: the modules' own initialisers take half a minute to compile and run for
    the VAE's 84M parameters on a CPU, and uniform draws are several times faster than normal.
    """
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray((rng.random(a.shape, np.float32) - 0.5) * 0.1), state)


def _time(fn: Callable[..., Any], state: Any, x: jax.Array) -> dict[str, Any]:
    """Compile ``fn(state, x)``, then time ``--reps`` calls; FLOPs from XLA's cost analysis."""
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(state, x)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(state, x))  # warm-up: first-run allocations
    times = []
    for _ in range(FLAGS.reps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(state, x))
        times.append(time.perf_counter() - start)
    batch_s = statistics.median(times)
    return {
        "compile_s": compile_s,
        "batch_s_median": batch_s,
        "batch_s_all": times,
        "images_per_s": x.shape[0] / batch_s,
        "gflops_per_image_xla": compiled.cost_analysis()["flops"] / x.shape[0] / 1e9,
    }


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.batch < 1 or FLAGS.reps < 1 or FLAGS.image_size < 1 or FLAGS.vae_latent_size < 0:
        raise ValueError("need --batch, --reps, --image_size >= 1 and --vae_latent_size >= 0")
    rng = np.random.default_rng(0)
    results: dict[str, dict[str, Any]] = {}

    apply, state = inception.inception_apply_fn(inception.InceptionV3())
    params, stats = nnx.split_state(state, nnx.Param, ...)
    # BatchNorm statistics stay at mean 0, variance 0 (+ eps): random variances could be negative.
    state = nnx.merge_state(_random_like(params, 0), stats)
    images = jnp.asarray(
        rng.uniform(-1, 1, (FLAGS.batch, FLAGS.image_size, FLAGS.image_size, 3)), jnp.float32
    )
    results["inception"] = _time(apply, state, images)
    results["inception"]["input"] = list(images.shape)

    if FLAGS.vae_latent_size:
        config = vae.VAEConfig()
        graphdef, abstract = nnx.split(
            nnx.eval_shape(lambda: vae.AutoencoderKL(config, rngs=nnx.Rngs(0)))
        )
        size, channels = FLAGS.vae_latent_size, config.latent_channels
        latents = jnp.asarray(rng.standard_normal((FLAGS.batch, size, size, channels)), jnp.float32)
        decode = lambda params, z: vae.decode(graphdef, params, z)
        results["vae_decoder"] = _time(decode, _random_like(abstract, 1), latents)
        results["vae_decoder"]["input"] = list(latents.shape)

    peak = matmul_peak(FLAGS.matmul_size)  # both networks run in float32
    for res in results.values():
        res["mfu_xla"] = res["gflops_per_image_xla"] * 1e9 * res["images_per_s"] / peak
    summary = {
        "batch": FLAGS.batch,
        **environment(),
        "matmul_peak_tflops": peak / 1e12,
        "peak_memory_bytes": peak_memory_bytes(),
        "networks": results,
    }
    print(
        f"batch {FLAGS.batch}, {summary['device']}, float32, matmul peak {peak / 1e9:.1f} GFLOP/s, "
        f"load average {' '.join(f'{v:.1f}' for v in summary['load_average'])}"
    )
    print(f"{'':13}{'input':>20}{'compile s':>11}{'batch s':>10}{'img/s':>9}{'GFLOP/img':>11}{'MFU':>8}")
    for name, r in results.items():
        print(
            f"{name:13}{'x'.join(map(str, r['input'])):>20}{r['compile_s']:11.1f}{r['batch_s_median']:10.3f}"
            f"{r['images_per_s']:9.1f}{r['gflops_per_image_xla']:11.2f}{r['mfu_xla']:8.1%}"
        )
    write_json(FLAGS.json_out, summary)


if __name__ == "__main__":
    app.run(main)
