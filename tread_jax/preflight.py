"""Checks that run before anything is compiled, each failing with one clear line.

Training a large model spends minutes compiling and loading before the first step; a typo in
the config should not cost that. ``check`` raises ValueError (bad config), FileNotFoundError
(missing dataset) or PermissionError (unusable workdir).
"""

from __future__ import annotations

import os
import tempfile

import jax
import ml_collections

from tread_jax import checkpoint, data, diffusion, models, routing, sharding, train_state


def model_settings(model_config: ml_collections.ConfigDict) -> dict:
    """Size settings of the configured model (named size, then overrides); ValueError if unknown."""
    _, kwargs = models.model_spec(model_config.name)
    kwargs.update(model_config.get("overrides", {}) or {})
    return kwargs


def config_routes(config: ml_collections.ConfigDict) -> tuple[routing.Route, ...]:
    """The config's routes, validated against the model's depth; ValueError naming the problem."""
    return routing.validate_routes(routing.parse_routes(config.routes), model_settings(config.model)["depth"])


def check_local_path(path: str, what: str) -> None:
    """ValueError for a URL such as gs://bucket/run: every writer here uses the local file
    system, which would quietly create a folder named "gs:" on the VM's disk instead."""
    if "://" in path:
        raise ValueError(
            f"{what} {path!r} is a URL; tread_jax reads and writes local paths: mount the bucket "
            "(gcsfuse; launch/tpu_pod.sh --gcs-bucket does it on every worker) and pass the mount path"
        )


def check_workdir(workdir: str) -> None:
    """The workdir is a local path that exists or can be created, and this process can write
    files into it."""
    check_local_path(workdir, "workdir")
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_probe_"):
            pass
    except OSError as error:
        raise PermissionError(f"workdir {workdir!r} is not writable: {error.strerror or error}") from None


def check(config: ml_collections.ConfigDict, workdir: str) -> data.DatasetInfo:
    """Validates the config against this job's devices and files; returns the dataset info."""
    settings = model_settings(config.model)
    config_routes(config)
    diffusion.create_objective(config.diffusion)
    train_state.learning_rate_schedule(config.optim)

    data_size, fsdp_size = sharding.mesh_shape(config.mesh, jax.device_count())
    parallel = data_size * fsdp_size
    batch = config.global_batch_size
    if batch <= 0 or batch % parallel:
        raise ValueError(
            f"global_batch_size {batch} is not divisible by the data-parallel size {parallel} "
            f"(mesh data={data_size} x fsdp={fsdp_size})"
        )
    # The mesh spans every device and each process holds the same number of them, so this also
    # makes the batch divisible by the process count (each process reads an equal share).
    if config.num_train_steps <= 0:
        raise ValueError(f"num_train_steps must be positive, got {config.num_train_steps}")
    decay_steps = config.optim.get("decay_steps", 0)
    if 0 < decay_steps < config.num_train_steps:
        raise ValueError(
            f"optim.decay_steps ({decay_steps}) is below num_train_steps ({config.num_train_steps}): the "
            "learning rate would stay 0 after it; change both (or decay_steps=0 for a constant rate)"
        )
    check_workdir(workdir)
    # A fine-tune starts from another run's checkpoint, needed only while this run has none.
    init_from = config.get("init_from", "")
    if init_from:
        check_local_path(init_from, "init_from")
        if not checkpoint.saved_steps(workdir) and not checkpoint.saved_steps(init_from):
            raise FileNotFoundError(
                f"init_from {init_from!r} holds no checkpoint (looked in {checkpoint.checkpoint_dir(init_from)})"
            )

    info = data.dataset_info(config.data)
    height, width, _ = info.image_shape
    if height != width:
        raise ValueError(f"dataset {info.name!r} images are {height}x{width}; the models need square inputs")
    if height % settings["patch_size"]:
        raise ValueError(
            f"image size {height} is not divisible by the patch size {settings['patch_size']} of "
            f"{config.model.name}"
        )
    return info
