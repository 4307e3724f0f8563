"""Attention formulations on the current backend: forward + backward time, interleaved.

``dot_product_attention`` is ``jax.nn.dot_product_attention`` (XLA path: 4-D einsums), what DiT
uses when a kernel is named (``attention_impl``); ``head_batched_attention`` is DiT's default,
the same math as head-batched ``[B*H, N, d]`` matmuls.

    python benchmarks/attention.py --batch=8 --tokens=256 --heads=4 --head_dim=64 --reps=20
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from tread_jax.models.dit import head_batched_attention

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 8, "batch")
flags.DEFINE_integer("tokens", 256, "sequence length")
flags.DEFINE_integer("heads", 4, "heads")
flags.DEFINE_integer("head_dim", 64, "head dimension")
flags.DEFINE_integer("reps", 20, "timed repetitions per formulation")


FORMULATIONS = {
    "dot_product_attention": jax.nn.dot_product_attention,
    "head_batched_attention": head_batched_attention,
}


def main(argv: list[str]) -> None:
    del argv
    shape = (FLAGS.batch, FLAGS.tokens, FLAGS.heads, FLAGS.head_dim)
    q, k, v = (
        jax.random.normal(key, shape) for key in jax.random.split(jax.random.key(0), 3)
    )
    fns = {}
    for name, attend in FORMULATIONS.items():
        loss = lambda q, k, v, attend=attend: jnp.sum(attend(q, k, v) ** 2)
        fns[name] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        jax.block_until_ready(fns[name](q, k, v))
    ref, test = (fns[n](q, k, v)[1][0] for n in FORMULATIONS)
    print(f"max |grad q| difference: {float(jnp.abs(ref - test).max()):.2e}")
    times = {name: [] for name in fns}
    for rep in range(FLAGS.reps):
        for name in list(fns) if rep % 2 == 0 else list(fns)[::-1]:
            start = time.perf_counter()
            jax.block_until_ready(fns[name](q, k, v))
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["dot_product_attention"])
    for name, ts in times.items():
        print(
            f"{name:24} fwd+bwd median {statistics.median(ts) * 1e3:8.2f} ms  ({statistics.median(ts) / base:.2f}x)"
        )


if __name__ == "__main__":
    app.run(main)
