"""Checks that run before anything is compiled, each failing with one clear line.

Training a large model spends minutes compiling and loading before the first step; a typo in
the config should not cost that. ``check`` raises ValueError (bad config), FileNotFoundError
(missing dataset) or PermissionError (unusable workdir: a local folder, or a ``gs://`` bucket
that is missing or that this machine's credentials cannot write to).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import uuid

import jax
import ml_collections
from etils import epath

from tread_jax import checkpoint, data, diffusion, models, paths, pretrained, routing, sharding, train_state


def model_settings(model_config: ml_collections.ConfigDict) -> dict:
    """Size settings of the configured model (named size, then overrides); ValueError if unknown."""
    _, kwargs = models.model_spec(model_config.name)
    kwargs.update(model_config.get("overrides", {}) or {})
    return kwargs


def check_workdir(workdir: str) -> None:
    """The workdir exists or can be created, and this process can write files into it. For a
    ``gs://`` workdir: the bucket is reachable with this machine's credentials and writable."""
    if paths.is_remote(workdir):
        check_bucket(workdir)
        return
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_probe_"):
            pass
    except OSError as error:
        raise PermissionError(f"workdir {workdir!r} is not writable: {error.strerror or error}") from None


def check_bucket(workdir: str) -> None:
    """Writes and deletes a probe object under ``workdir``; PermissionError naming the bucket and
    the problem (missing bucket, no or insufficient credentials, unreachable) otherwise."""
    probe = epath.Path(workdir) / f".write_probe_{uuid.uuid4().hex}"
    try:
        probe.write_text("")
        probe.unlink()
    except Exception as error:  # noqa: BLE001 - gcsfs and google-auth raise many kinds; all mean "unusable"
        raise PermissionError(
            f"workdir {workdir!r}: bucket {paths.bucket(workdir)!r} is not writable from this machine: "
            f"{_storage_problem(error)}"
        ) from None


def _saved_steps(workdir: str, what: str) -> list[int]:
    """``checkpoint.saved_steps``; for a bucket that cannot be listed, PermissionError naming it
    and the problem (nothing is written: an ``init_from`` run is only read)."""
    try:
        return checkpoint.saved_steps(workdir)
    except Exception as error:  # noqa: BLE001 - gcsfs and google-auth raise many kinds
        if not paths.is_remote(workdir):
            raise
        raise PermissionError(
            f"{what} {workdir!r}: bucket {paths.bucket(workdir)!r} cannot be read from this machine: "
            f"{_storage_problem(error)}"
        ) from None


def _storage_problem(error: Exception) -> str:
    """One line saying what went wrong talking to Cloud Storage, and what to check."""
    detail = " ".join(str(error).split())[:300] or type(error).__name__
    if isinstance(error, FileNotFoundError):
        return f"the bucket does not exist or these credentials cannot see it ({detail})"
    if "credential" in type(error).__module__ or "credential" in detail.lower() or "token" in detail.lower():
        return (f"no usable credentials ({type(error).__name__}: {detail}); on a VM give its service "
                "account storage access, elsewhere run `gcloud auth application-default login`")
    code = getattr(error, "code", None)
    if code == 401:
        return f"not authenticated ({detail}): no usable credentials were found"
    if code == 403:
        return f"access denied ({detail}); the credentials need storage.objects.create on the bucket"
    if isinstance(error, OSError):  # aiohttp's connection errors are OSErrors too
        return f"Cloud Storage is not reachable ({type(error).__name__}: {detail})"
    return f"{type(error).__name__}: {detail}"


# Every count and interval the trainer reads, with what it counts. A positive field divides or
# sizes something (0 would divide by zero or sample nothing); a non-negative field turns its
# feature off at 0. Fields a config does not have are skipped (the trainer reads them with defaults).
POSITIVE = {
    "num_train_steps": "training steps",
    "global_batch_size": "images per step over all devices",
    "log_every": "steps between log lines",
    "checkpoint_every": "steps between checkpoints",
    "max_to_keep": "checkpoints kept",
    "sample.per_class": "grid samples per class",
    "eval.draws": "sample sets the quality report averages",
    "eval.per_device_batch": "evaluation samples per device per batch",
    "data.num_threads": "reader threads per process",
    "data.prefetch_buffer_size": "batches read ahead",
    "data.device_prefetch": "global batches placed on the devices ahead",
    "steps_per_call": "train steps per jitted call",
}
NON_NEGATIVE = {
    "sample.every": "steps between sample grids, 0 = none",
    "eval.every": "steps between in-loop evaluations, 0 = none",
    "eval.num_samples": "samples per evaluation, 0 = the config's default",
    "optim.warmup_steps": "learning-rate warmup steps",
    "optim.decay_steps": "step where the cosine decay reaches 0, 0 = constant",
    "data.worker_count": "grain worker processes, 0 = none",
    "fsdp_min_size": "elements below which a parameter stays replicated",
    "profile_steps": "steps traced by the profiler, 0 = none",
}
# Counted in steps but acted on between jitted calls: each must be a multiple of steps_per_call.
PER_CALL = ("num_train_steps", "log_every", "checkpoint_every", "sample.every", "eval.every", "profile_steps")
# Sampler step counts, checked by the objective itself (EDM's Heun needs at least 2).
SAMPLER_STEPS = ("sample.num_steps", "eval.num_steps")


def get_field(config: ml_collections.ConfigDict, path: str) -> tuple[bool, object]:
    """``(present, value)`` of a dotted field."""
    node = config
    for key in path.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or key not in node:
            return False, None
        node = node[key]
    return True, node


def check_counts(config: ml_collections.ConfigDict) -> None:
    """ValueError naming the first count or interval that is not an integer in its range."""
    for fields, lowest, kind in ((POSITIVE, 1, "positive"), (NON_NEGATIVE, 0, ">= 0")):
        for path, meaning in fields.items():
            present, value = get_field(config, path)
            if not present:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{path} must be an integer, got {value!r} ({meaning})")
            if value < lowest:
                raise ValueError(f"{path} must be {kind}, got {value} ({meaning})")


def check_steps_per_call(config: ml_collections.ConfigDict) -> None:
    """ValueError naming the first step count that a call of ``steps_per_call`` steps would skip."""
    steps_per_call = config.get("steps_per_call", 1)
    for path in PER_CALL:
        present, value = get_field(config, path)
        if present and value % steps_per_call:
            raise ValueError(f"{path} ({value}) must be a multiple of steps_per_call ({steps_per_call})")


def config_routes(config: ml_collections.ConfigDict) -> tuple[routing.Route, ...]:
    """The config's routes, validated against the model's depth; ValueError naming the problem."""
    try:
        routes = routing.parse_routes(config.routes)
    except (TypeError, ValueError, KeyError, IndexError) as error:
        raise ValueError(
            f"routes {config.routes!r} do not parse ({error}): expected a tuple of routes, each "
            "{'start': S, 'end': E, 'ratio': R[, 'group': G, 'rejoin': 'sprint', 'path_drop': P]} or "
            "(S, E, R), e.g. '((2, 8, 0.5),)'; () = dense"
        ) from None
    return routing.validate_routes(routes, model_settings(config.model)["depth"])


def check_sampler_steps(config: ml_collections.ConfigDict) -> None:
    """Each sampler step count is valid for the configured objective."""
    objective = diffusion.create_objective(config.diffusion)
    for path in SAMPLER_STEPS:
        present, value = get_field(config, path)
        if present:
            try:
                dataclasses.replace(objective, num_steps=value)
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from None


def check(config: ml_collections.ConfigDict, workdir: str) -> data.DatasetInfo:
    """Validates the config against this job's devices and files; returns the dataset info.

    The workdir comes last, so that a run refused for any other reason leaves no trace there.
    """
    check_counts(config)
    check_steps_per_call(config)
    settings = model_settings(config.model)
    config_routes(config)
    check_sampler_steps(config)
    train_state.learning_rate_schedule(config.optim)

    data_size, fsdp_size = sharding.mesh_shape(config.mesh, jax.device_count())
    parallel = data_size * fsdp_size
    batch = config.global_batch_size
    if batch % parallel:
        raise ValueError(
            f"global_batch_size {batch} is not divisible by the data-parallel size {parallel} "
            f"(mesh data={data_size} x fsdp={fsdp_size})"
        )
    # The mesh spans every device and each process holds the same number of them, so this also
    # makes the batch divisible by the process count (each process reads an equal share).
    decay_steps = config.optim.get("decay_steps", 0)
    if 0 < decay_steps < config.num_train_steps:
        raise ValueError(
            f"optim.decay_steps ({decay_steps}) is below num_train_steps ({config.num_train_steps}): the "
            "learning rate would stay 0 after it; change both (or decay_steps=0 for a constant rate)"
        )
    # A fine-tune starts from another run's checkpoint, needed only while this run has none.
    init_from = config.get("init_from", "")
    if init_from and not pretrained.is_diffusers_source(init_from):
        if not _saved_steps(workdir, "workdir") and not _saved_steps(init_from, "init_from"):
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
    # A diffusers DiT to start from, needed only to start: after the cheap checks, since a hub id
    # is fetched here (gigabytes).
    if pretrained.is_diffusers_source(init_from) and not _saved_steps(workdir, "workdir"):
        pretrained.resolve(init_from)
    check_workdir(workdir)
    return info
