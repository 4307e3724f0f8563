"""Device mesh and partition rules: the only place that decides where arrays live.

The mesh has two named axes. ``data`` replicates parameters and splits the batch; ``fsdp``
splits the batch as well and also shards large parameters (and therefore their optimizer
state and EMA copy) along their largest divisible dimension, so memory per device falls with
the ``fsdp`` size. The batch is split over both axes together.

The axes are ``AxisType.Auto``: the step is jitted with explicit input and output shardings
and XLA propagates shardings through the model, so model code needs no sharding annotations
and no ``jax.set_mesh`` context (jax 0.10's default, ``Explicit``, would require both).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
# The batch dimension is split over every device: data-parallel size = data * fsdp.
BATCH_SPEC = PartitionSpec(MESH_AXES)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, int]:
    """Resolves ``{"data": d, "fsdp": f}`` (one of them may be -1 = the rest) to sizes."""
    sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} does not divide the {num_devices} devices"
        )
    sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} of {num_devices} devices"
        )
    return sizes[0], sizes[1]


def create_mesh(mesh_config: Mapping[str, int]) -> Mesh:
    """A ``(data, fsdp)`` mesh over all devices of all processes."""
    shape = mesh_shape(mesh_config, jax.device_count())
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split."""
    return mesh.shape[DATA_AXIS] * mesh.shape[FSDP_AXIS]


def param_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> PartitionSpec:
    """FSDP rule for one array: shard its largest dimension divisible by the ``fsdp`` size.

    Arrays smaller than ``min_size`` elements (biases, norms, small embeddings) stay
    replicated: sharding them saves little memory and costs a gather each step.
    """
    if fsdp_size == 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    # Largest dimension first; ties go to the later dimension (the output features of a kernel).
    for dim in sorted(range(len(shape)), key=lambda d: (shape[d], d), reverse=True):
        if shape[dim] % fsdp_size == 0:
            return PartitionSpec(*([None] * dim + [FSDP_AXIS]))
    return PartitionSpec()


def state_shardings(abstract_state, mesh: Mesh, min_size: int):
    """NamedShardings for a pytree of arrays (params, optimizer state, EMA) by the FSDP rule.

    Optimizer moments have the shapes of their parameters, so they get the same placement;
    scalars such as step counts are replicated.
    """
    fsdp_size = mesh.shape[FSDP_AXIS]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp_size, min_size)),
        abstract_state,
    )


def batch_sharding(mesh: Mesh, *, stacked: bool = False) -> NamedSharding:
    """Leading (batch) dimension split over all devices, the rest whole. ``stacked``: batches
    stacked on a leading steps axis (several steps per call), split along the second."""
    return NamedSharding(mesh, PartitionSpec(None, MESH_AXES) if stacked else BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
    """The same value on every device."""
    return NamedSharding(mesh, PartitionSpec())


def global_batch(
    local_batch: Mapping[str, np.ndarray], mesh: Mesh, *, stacked: bool = False
) -> dict[str, jax.Array]:
    """This process's share of the batch -> global arrays split over the mesh.

    Each process holds ``global_batch / process_count`` consecutive examples; jax stitches
    the shares together in process order without any cross-host copy. ``stacked``: the arrays
    have a leading steps axis before the batch axis (``batch_sharding``).
    """
    sharding = batch_sharding(mesh, stacked=stacked)
    batch_axis = 1 if stacked else 0
    out = {}
    for name, local in local_batch.items():
        local = np.asarray(local)
        global_shape = list(local.shape)
        global_shape[batch_axis] *= jax.process_count()
        out[name] = jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))
    return out
