"""Forward+backward time of the associative (parallel) vs sequential selective scan.

    python benchmarks/ssm_scan.py [--lengths 256,1024,4096] [--batch 2] [--channels 64] \
        [--state 16] [--reps 15]

Both methods are compiled first, then timed in interleaved repetitions (associative, sequential,
associative, ...) so that load on a shared machine hits both alike; the table gives medians
and the sequential/associative ratio (> 1: the parallel scan is faster). Prints a markdown
section for benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from tread_jax.models.scan import METHODS, selective_scan


def make_inputs(length: int, batch: int, channels: int, state: int):
    ks = jax.random.split(jax.random.key(0), 6)
    return (
        jax.random.normal(ks[0], (batch, length, channels)),
        jax.nn.softplus(jax.random.normal(ks[1], (batch, length, channels)) - 2.0),
        -jnp.exp(jax.random.normal(ks[2], (channels, state))),
        jax.random.normal(ks[3], (batch, length, state)),
        jax.random.normal(ks[4], (batch, length, state)),
        jax.random.normal(ks[5], (channels,)),
    )


def forward_backward(method: str):
    """A jitted function returning the loss and the gradients of all six scan inputs."""
    return jax.jit(jax.value_and_grad(lambda args: jnp.sum(selective_scan(*args, method=method) ** 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,1024,4096")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    lengths = [int(v) for v in args.lengths.split(",")]
    if args.reps < 1 or min(lengths) < 1:
        raise ValueError("--reps and every length must be >= 1")

    rows = []
    for length in lengths:
        inputs = make_inputs(length, args.batch, args.channels, args.state)
        fns = {m: forward_backward(m) for m in METHODS}
        for fn in fns.values():
            jax.block_until_ready(fn(inputs))  # compile and warm up outside the timing
        times = {m: [] for m in METHODS}
        for _ in range(args.reps):
            for method, fn in fns.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(inputs))
                times[method].append(time.perf_counter() - start)
        med = {m: statistics.median(t) * 1e3 for m, t in times.items()}
        rows.append((length, med["associative"], med["sequential"], med["sequential"] / med["associative"]))
        print(
            f"L={length}: associative {med['associative']:.2f} ms, sequential {med['sequential']:.2f} ms",
            file=sys.stderr,
        )

    device = jax.devices()[0]
    print("## Selective scan: associative vs sequential (benchmarks/ssm_scan.py)\n")
    command = " ".join(["python benchmarks/ssm_scan.py", *sys.argv[1:]])
    print(f"Command: `{command}`  ")
    print(
        f"Device: {device.platform} ({device.device_kind}, {len(jax.devices())} device(s)), "
        f"{platform.processor() or platform.machine()}; jax {jax.__version__}, python {platform.python_version()}  "
    )
    print(
        f"Forward + backward (gradients of all inputs) of `selective_scan`, batch {args.batch}, "
        f"{args.channels} channels, state {args.state}, float32; median of {args.reps} interleaved repetitions.\n"
    )
    print("| L | associative (ms) | sequential (ms) | sequential / associative |")
    print("|---|---|---|---|")
    for length, assoc, seq, ratio in rows:
        print(f"| {length} | {assoc:.2f} | {seq:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
