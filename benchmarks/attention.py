"""Attention formulations on the current backend: forward + backward time, interleaved.

``dot_product_attention`` is what DiT uses (``jax.nn.dot_product_attention``, XLA path: 4-D
einsums); ``batched_matmul`` is the same math as head-batched ``[B*H, N, d]`` matmuls, the
form an earlier prototype found faster in backward on a 2-core CPU.

    python benchmarks/attention.py --batch=8 --tokens=256 --heads=4 --head_dim=64 --reps=20
"""

from __future__ import annotations

import statistics
import time

import einops
import jax
import jax.numpy as jnp
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 8, "batch")
flags.DEFINE_integer("tokens", 256, "sequence length")
flags.DEFINE_integer("heads", 4, "heads")
flags.DEFINE_integer("head_dim", 64, "head dimension")
flags.DEFINE_integer("reps", 20, "timed repetitions per formulation")


def batched_matmul(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention over ``[B, N, H, d]`` inputs as ``[B*H, N, d]`` batched matmuls."""
    b, _, _, d = q.shape
    q, k, v = (einops.rearrange(t, "b n h d -> (b h) n d") for t in (q, k, v))
    weights = jax.nn.softmax(jnp.matmul(q, k.transpose(0, 2, 1)) * d**-0.5, axis=-1)
    return einops.rearrange(jnp.matmul(weights, v), "(b h) n d -> b n h d", b=b)


FORMULATIONS = {
    "dot_product_attention": jax.nn.dot_product_attention,
    "batched_matmul": batched_matmul,
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
