"""Helpers shared by the benchmark scripts: model flags and setup, matmul peak, XLA cost, output.

The scripts run as ``python benchmarks/<name>.py``, so Python puts this directory on the path
and they import this module as ``_common``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
from absl import flags

from tread_jax import data, diffusion, routing
from tread_jax.model_builder import ModelBuilder
from tread_jax.models.backbone import REMAT_POLICIES

FLAGS = flags.FLAGS


def define_model_flags(*, model: str = "DiT-S/2", batch: int = 8, route: bool = False) -> None:
    """The flags that pick the model and its input (and, with ``route``, one TREAD route)."""
    flags.DEFINE_string("model", model, "registry name")
    flags.DEFINE_list(
        "overrides",
        [],
        "size overrides key=value, e.g. depth=6,hidden_size=256,num_heads=4",
    )
    flags.DEFINE_integer("batch", batch, "global batch size")
    flags.DEFINE_integer("input_size", 32, "latent/image side")
    flags.DEFINE_integer("in_channels", 4, "latent/image channels")
    flags.DEFINE_integer(
        "num_classes", 1000, "classes (the label table gets one more, the null class)"
    )
    flags.DEFINE_enum(
        "dtype",
        "float32",
        ["float32", "bfloat16"],
        "compute dtype (parameters stay float32)",
    )
    flags.DEFINE_bool(
        "scan_blocks", False, "config.model.scan_blocks: lax.scan over stretches of equal blocks"
    )
    flags.DEFINE_enum(
        "remat", "none", list(REMAT_POLICIES), "config.model.remat: activation checkpointing per block"
    )
    if route:
        flags.DEFINE_string(
            "route", "", "start,end,ratio; empty = the default route 2,depth-4,0.5 (docs/method.md)"
        )


def define_output_flags() -> None:
    """``--matmul_size`` (the MFU denominator) and ``--json_out``."""
    flags.DEFINE_integer(
        "matmul_size",
        2048,
        "side of the square matmul that measures peak; 0 = skip",
    )
    flags.DEFINE_string("json_out", "", "also write the results here as JSON")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["depth=6", "mlp_ratio=4.0", "scan_blocks=true", "remat=dots"]`` -> ints, floats,
    booleans and (anything else) strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--overrides item {item!r} is not key=value")
        if value.lower() in ("true", "false"):
            out[key] = value.lower() == "true"
            continue
        for kind in (int, float, str):
            try:
                out[key] = kind(value)
                break
            except ValueError:
                pass
    return out


def train_config(
    model: str, overrides: dict[str, Any], dtype: str, *, scan_blocks: bool = False, remat: str = "none"
) -> ml_collections.ConfigDict:
    """The training config fields the step reads, at the published defaults (docs/method.md: AdamW 1e-4, EMA 0.9999)."""
    return ml_collections.ConfigDict(
        {
            "seed": 0,
            "model": {
                "name": model,
                "overrides": overrides,
                "compute_dtype": dtype,
                "scan_blocks": scan_blocks,
                "remat": remat,
            },
            "route_loss": {"enabled": False, "mae_coef": 0.0},
            "data": data.default_config().to_dict(),
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
            "mesh": {"data": -1, "fsdp": 1},
        }
    )


@dataclasses.dataclass(frozen=True)
class ModelSetup:
    """The model the flags name: its config, the trainer's ModelBuilder and the abstract module."""

    config: ml_collections.ConfigDict
    overrides: dict[str, Any]
    info: data.DatasetInfo
    model: ModelBuilder
    abstract: Any  # the module from nnx.eval_shape: shapes only, no parameters allocated

    @property
    def num_params(self) -> int:
        return sum(p.size for p in jax.tree.leaves(flax.nnx.state(self.abstract, flax.nnx.Param)))


def model_setup() -> ModelSetup:
    """Builds the model of ``define_model_flags`` as the trainer does, without initialising it."""
    overrides = parse_overrides(FLAGS.overrides)
    config = train_config(
        FLAGS.model, overrides, FLAGS.dtype, scan_blocks=FLAGS.scan_blocks, remat=FLAGS.remat
    )
    info = data.DatasetInfo(
        name="random",
        image_shape=(FLAGS.input_size, FLAGS.input_size, FLAGS.in_channels),
        num_classes=FLAGS.num_classes,
        num_train=0,
        num_test=0,
    )
    model = ModelBuilder(config, info)
    return ModelSetup(config, overrides, info, model, model.abstract_model)


def unscanned_model(setup: ModelSetup) -> ModelBuilder:
    """``setup.model``, built without ``scan_blocks`` if it scans: XLA's cost analysis counts
    the body of a loop once, so FLOPs of a scanned model must be counted on the unrolled one
    (the same computation)."""
    if not setup.config.model.scan_blocks:
        return setup.model
    config = setup.config.copy_and_resolve_references()
    config.model.scan_blocks = False
    return ModelBuilder(config, setup.info)


def route_from_flag(spec: str, depth: int) -> tuple[routing.Route, ...]:
    """``--route`` ("start,end,ratio") validated for ``depth``; empty = ``routing.default_route``."""
    route = routing.parse_routes([spec.split(",")]) if spec else (routing.default_route(depth),)
    return routing.validate_routes(route, depth)


def forward_macs_xla(model: ModelBuilder, batch: int, routes: tuple[routing.Route, ...]) -> float:
    """Forward MACs from XLA's cost analysis of the lowered (uncompiled) forward program."""

    def forward(params, x, t, y, key):
        network = model.bind(params)
        plan = routing.draw_plan(key, routes, batch_size=batch, num_tokens=network.num_tokens(*x.shape[1:3]),
                                 keep_order=network.keep_order)
        return network(x, t, y, route_plan=plan)

    lowered = jax.jit(forward).lower(
        model.abstract_params(),
        jax.ShapeDtypeStruct((batch, *model.image_shape), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
        jax.random.key(0),
    )
    return lowered.cost_analysis()["flops"] / 2


def matmul_peak(n: int, dtype: str = "float32", reps: int = 5) -> float:
    """Best FLOP/s of an n x n matmul in ``dtype`` on the default device (the MFU denominator).

    NaN when ``n`` is 0 (peak not measured), so MFU figures come out NaN rather than wrong.
    """
    if n == 0:
        return float("nan")
    a = jax.random.normal(jax.random.key(0), (n, n)).astype(dtype)
    matmul = jax.jit(lambda a: a @ a)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_memory_bytes() -> int | None:
    """Peak bytes in use on the default device since start, where the backend reports it
    (GPU, TPU); None on CPU."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def environment() -> dict[str, Any]:
    """Device, library versions and the load on this host: what every measurement records."""
    return {
        "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
        "platform": platform.platform(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "load_average": os.getloadavg(),
    }


def write_json(path: str, summary: dict[str, Any]) -> None:
    """The results as JSON (non-finite floats become null, so the file is strict JSON)."""
    if not path:
        return

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    with open(path, "w", encoding="utf-8") as f:
        json.dump(clean(summary), f, indent=1)
