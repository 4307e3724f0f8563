"""The digits train steps under glibc's default allocator and under ``tread_jax.host_allocator``'s.

    python benchmarks/host_allocator.py [--rounds 3] [--steps 20]

glibc reads its settings only when a process starts, so each measurement is a subprocess: for
each round, the DiT default's and the SSM variant's train steps (``backbone_step.make_step``:
routed as configured, batch 64) each run once with the default settings and once with
``host_allocator.SETTINGS`` (the order rotating), and report per step: wall time, user and
system CPU time and minor page faults. Prints the medians over rounds and each program's
settings/default ratios. CPU time is less sensitive than wall time to other jobs on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from tread_jax import host_allocator

PROGRAMS = {"DiT": None, "SSM": "ssm"}  # configs/digits.py variants
MODES = ("default", "host_allocator")


def measure_in_this_process(program: str, steps: int) -> dict[str, float]:
    """Per-step wall time, user and system time (ms) and minor page faults of ``steps`` warm steps."""
    from backbone_step import make_step  # imports jax: only in the children

    run, state = make_step(PROGRAMS[program], 64, dense=False)
    state = run(state, 3)  # compile and warm up
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    run(state, steps)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wall ms": 1e3 * wall / steps,
        "user ms": 1e3 * (after.ru_utime - before.ru_utime) / steps,
        "system ms": 1e3 * (after.ru_stime - before.ru_stime) / steps,
        "page faults": (after.ru_minflt - before.ru_minflt) / steps,
    }


def compare(rounds: int, steps: int) -> dict[str, dict[str, float]]:
    runs = {(program, mode): [] for program in PROGRAMS for mode in MODES}
    for rnd in range(rounds):
        for program in PROGRAMS:
            for mode in MODES if rnd % 2 == 0 else MODES[::-1]:
                env = {k: v for k, v in os.environ.items() if k not in host_allocator.SETTINGS}
                env.update(host_allocator.SETTINGS if mode == "host_allocator" else {})
                out = subprocess.run([sys.executable, __file__, "--child", program, "--steps", str(steps)],
                                     env=env, check=True, capture_output=True, text=True).stdout
                runs[(program, mode)].append(json.loads(out.splitlines()[-1]))
    result = {}
    for (program, mode), figures in runs.items():
        result[f"{program}, {mode}"] = {key: statistics.median(f[key] for f in figures) for key in figures[0]}
    for program in PROGRAMS:
        new, old = result[f"{program}, host_allocator"], result[f"{program}, default"]
        result[f"{program}, host_allocator / default"] = {
            "wall time": new["wall ms"] / old["wall ms"],
            "CPU time": (new["user ms"] + new["system ms"]) / (old["user ms"] + old["system ms"]),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed train steps per process")
    parser.add_argument("--child", choices=PROGRAMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_in_this_process(args.child, args.steps)))
        return
    for name, figures in compare(args.rounds, args.steps).items():
        print(f"{name}: " + ", ".join(f"{key} {value:.2f}" for key, value in figures.items()))


if __name__ == "__main__":
    main()
