"""``--check``: what a training run would be, without training it.

Runs every preflight check for the config and workdir on the devices at hand, then describes
the run: the resolved config, the mesh, the parameter count, the model FLOPs per step (dense
and routed) and XLA's memory estimate per device for the train step, compiled from abstract
shapes (nothing is initialised or allocated). Writes nothing beyond what preflight writes.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from tread_jax import data, diffusion, preflight, sharding, train_state
from tread_jax.data import latents
from tread_jax.diffusion import repa
from tread_jax.model_builder import ModelBuilder, with_shardings
from tread_jax.models import flops
from tread_jax.models.dit import DiT
from tread_jax.train_step import REPA_IMAGE_KEY, jit_train_call, metrics_type


def _abstract_batch(config: ml_collections.ConfigDict, info: data.DatasetInfo, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """ShapeDtypeStructs of the batches of one train call as the pipeline yields them (latents
    carry their std)."""
    per_call = config.get("steps_per_call", 1)
    split = sharding.batch_sharding(mesh, stacked=per_call > 1)
    steps = (per_call,) if per_call > 1 else ()  # several steps per call: their batches stacked
    image = jax.ShapeDtypeStruct((*steps, config.global_batch_size, *info.image_shape), jnp.float32, sharding=split)
    batch = {"image": image, "label": jax.ShapeDtypeStruct((*steps, config.global_batch_size), jnp.int32, sharding=split)}
    if not data.DATASETS[info.name].pixel_space:
        batch["image_std"] = image
    if repa.active_config(config) is not None:
        size = info.image_shape[0] * latents.DOWNSAMPLE  # the stored crops REPA's encoder sees
        batch[REPA_IMAGE_KEY] = jax.ShapeDtypeStruct((*steps, config.global_batch_size, size, size, 3), jnp.uint8,
                                                     sharding=split)
    return batch


def _bytes(num: float) -> str:
    return f"{num / 2**30:.2f} GiB" if num >= 2**30 else f"{num / 2**20:.1f} MiB"


def _flops(num: float) -> str:
    return f"{num / 1e12:.1f} TFLOP" if num >= 1e12 else f"{num / 1e9:.2f} GFLOP"


def describe_run(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The description ``--check`` prints; raises preflight's one-line errors."""
    info = preflight.check(config, workdir)
    routes = preflight.config_routes(config)
    mesh = sharding.create_mesh(config.mesh)
    model = ModelBuilder(config, info)
    tx = train_state.create_optimizer(config.optim)
    abstract_state = jax.eval_shape(lambda: train_state.init_train_state(model.init_params(), tx))
    state_sharding = sharding.state_shardings(abstract_state, mesh, config.fsdp_min_size)
    num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
    lines = [
        "config:", str(config).rstrip(),
        f"devices: {jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} device(s); "
        f"mesh {dict(mesh.shape)}",
        f"dataset: {info.name} {info.image_shape}, {info.num_classes} classes, {info.num_train} training examples",
        f"model: {config.model.name} {dict(config.model.get('overrides', {}) or {})}, {num_params:,} parameters; "
        f"routes {list(routes)}",
    ]
    height, width, _ = info.image_shape
    if isinstance(model.abstract_model, DiT):
        # A train step costs about 3 forward passes (the backward pass is about twice the forward).
        per_step = {name: 3 * 2 * flops.dit_forward_macs(model.abstract_model, height, width, r) * config.global_batch_size
                    for name, r in (("dense", ()), ("routed", routes))}
        lines.append(f"model FLOPs per step (3 x forward, batch {config.global_batch_size}): "
                     f"dense {_flops(per_step['dense'])}, routed {_flops(per_step['routed'])} "
                     f"({per_step['routed'] / per_step['dense']:.2f} x dense)")
        if model.repa is not None:
            abstract = model.abstract_model
            extra = repa.repa_macs(model.repa, abstract.hidden_size, abstract.depth, height * latents.DOWNSAMPLE,
                                   abstract.num_tokens(height, width), routes)
            lines.append(f"REPA FLOPs per step (encoder forward, projector and loss forward + backward): "
                         f"{_flops(2 * extra.total * config.global_batch_size)}, "
                         f"+{extra.total / (per_step['routed'] / 2 / config.global_batch_size):.1%} over the routed step")
    else:
        lines.append(f"model FLOPs per step: no analytic count for {type(model.abstract_model).__name__}")

    started = time.perf_counter()
    train_call = jit_train_call(config, model, diffusion.create_objective(config.diffusion), tx, routes, mesh,
                                state_sharding)
    metrics = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding.replicated(mesh)),
                           jax.eval_shape(metrics_type(config).empty))
    compiled = train_call.lower(with_shardings(abstract_state, state_sharding), _abstract_batch(config, info, mesh),
                                metrics).compile()
    memory = compiled.memory_analysis()
    per_call = config.get("steps_per_call", 1)
    per_call_note = f", {per_call} steps per call" if per_call > 1 else ""
    if memory is None:
        lines.append("train step memory: XLA gives no estimate on this platform")
    else:
        total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                 + memory.temp_size_in_bytes)
        lines.append(
            f"train step memory per device (XLA estimate{per_call_note}): {_bytes(total)} = arguments "
            f"{_bytes(memory.argument_size_in_bytes)} + outputs {_bytes(memory.output_size_in_bytes)} - donated "
            f"{_bytes(memory.alias_size_in_bytes)} + temporaries {_bytes(memory.temp_size_in_bytes)} "
            f"(compiled from abstract shapes in {time.perf_counter() - started:.1f}s)")
    return "\n".join(lines)
