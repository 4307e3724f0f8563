"""ImageNet as SD-VAE latent moments: the TFDS array_record dataset that prepare_latents writes.

Layout: ``<data_dir>/imagenet<res>_latents/1.0.0/`` holds plain TFDS array_record shards
(``imagenet256_latents-train.array_record-00003-of-00313``) and, once every shard is written,
TFDS's ``dataset_info.json``/``features.json``. So the dataset is read with the standard
``tfds.builder_from_directory(...).as_data_source()`` (random access, no TensorFlow), exactly
like the digits, and the training pipeline needs nothing latent-specific except ``decode``.
The shards are written directly with ``array_record`` rather than by a TFDS builder's
``download_and_prepare`` because that can neither resume a half-finished split, nor let
several hosts write disjoint shards of one split, nor spread encoding over devices.

Records: ``mean`` and ``logvar`` float16 [res/8, res/8, 4] (NHWC; the posterior of the VAE
encoder, log-variance clipped to [-30, 20] as diffusers does) and ``label`` (ClassLabel over
the sorted wnids). With flips each image contributes two consecutive records: the image, then
its horizontal mirror, each encoded separately (a latent cannot be mirrored exactly).

With ``--store_images`` (for REPA, ``tread_jax.diffusion.repa``) each record also holds
``repa_image``: the centre crop its latents encode (the mirror's for a mirror record) as PNG
bytes, lossless. ``decode`` leaves them out; ``decode_images`` decodes them to uint8, which the
pipeline does only for a REPA run.

Training draws ``z = 0.18215 * (mean + exp(logvar / 2) * noise)`` with fresh noise every step.
``decode`` prepares the two parts on the host, ``image = 0.18215 * mean`` and
``image_std = 0.18215 * exp(logvar / 2)``, and the train step adds ``image_std * noise`` on
device, where noise is cheap and follows the step's key (so a resumed run draws the same).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from flax import nnx
from PIL import Image

VERSION = "1.0.0"
RESOLUTIONS = (256, 512)  # the registered datasets; the tool also writes other sizes (tests)
SCALE = 0.18215  # sd-vae-ft-ema's scaling_factor: latents * SCALE have about unit variance
LATENT_CHANNELS = 4
DOWNSAMPLE = 8  # the SD VAE maps res x res pixels to res/8 x res/8 latents
IMAGE_FEATURE = "repa_image"  # the stored clean crop, and its key in a decoded REPA batch


def dataset_name(resolution: int) -> str:
    """TFDS name (and config ``data.name``) of the latents at ``resolution``: imagenet256_latents."""
    return f"imagenet{resolution}_latents"


def prepare_command(resolution: int, *, images: bool = False) -> str:
    """The command that builds the dataset (used in the trainer's missing-data errors)."""
    return (
        f"python -m tread_jax.data.prepare_latents --source=folder --data_dir=/path/to/imagenet "
        f"--resolution={resolution} --vae=stabilityai/sd-vae-ft-ema --output_dir=<the data_dir above>"
        + (" --store_images" if images else "")
    )


def features(resolution: int, class_names: Sequence[str], *, images: bool = False) -> tfds.features.FeaturesDict:
    """The record schema for ``resolution`` pixel images and the given classes; ``images`` adds
    the stored crops (``IMAGE_FEATURE``)."""
    side = resolution // DOWNSAMPLE
    shape = (side, side, LATENT_CHANNELS)
    schema = {
        "mean": tfds.features.Tensor(shape=shape, dtype=np.float16),
        "logvar": tfds.features.Tensor(shape=shape, dtype=np.float16),
        "label": tfds.features.ClassLabel(names=list(class_names)),
    }
    if images:
        schema[IMAGE_FEATURE] = tfds.features.Tensor(shape=(), dtype=np.object_)  # PNG bytes
    return tfds.features.FeaturesDict(schema)


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 ``[H, W, 3]`` -> PNG bytes (lossless)."""
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(out, format="PNG")
    return out.getvalue()


def decode_images(pngs: Sequence[bytes]) -> np.ndarray:
    """Stored PNG bytes -> uint8 ``[n, H, W, 3]``. (Stacked by numpy as fixed-width bytes, which
    drop trailing zero bytes: a PNG never ends in one, its last chunk ends with a fixed CRC.)"""
    return np.stack([np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in pngs])


def decode(records: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stacked records -> {"image": SCALE*mean, "image_std": SCALE*std (f32 NHWC), "label": i32}."""
    mean = records["mean"].astype(np.float32)
    std = np.exp(0.5 * records["logvar"].astype(np.float32))
    return {
        "image": SCALE * mean,
        "image_std": SCALE * std,
        "label": records["label"].astype(np.int32),
    }


def spec_kwargs(resolution: int) -> dict[str, Any]:
    """Arguments of ``pipeline.DatasetSpec`` for the latents at ``resolution``."""
    return dict(
        tfds_name=dataset_name(resolution),
        version=VERSION,
        decode=decode,
        pixel_space=False,
        prepare=None,  # needs the user's ImageNet and hours of encoding
        prepare_hint=f"prepare the latents with: {prepare_command(resolution)}",
    )


def sample_latents(batch: dict[str, jax.Array], key: jax.Array) -> jax.Array:
    """The training input of a decoded batch: a fresh posterior sample when ``image_std`` is there.

    Pixel datasets (no ``image_std``) pass through unchanged, so the train step can call this
    for every dataset.
    """
    x = batch["image"]
    if "image_std" not in batch:
        return x
    return x + batch["image_std"] * jax.random.normal(key, x.shape, x.dtype)


def vae_decoder(vae: str) -> tuple[Callable[[Any, jax.Array], jax.Array], Any]:
    """``(decode, params)``: pure ``decode(params, latents)`` from scaled latents [N, h, w, 4] to
    images [N, 8h, 8w, 3] in [-1, 1], for use inside jitted programs.

    ``vae`` is a diffusers folder or "stabilityai/sd-vae-ft-ema".
    """
    from tread_jax import vae as vae_lib  # pylint: disable=g-import-not-at-top  # heavy, optional

    model, _ = vae_lib.load_vae(vae)
    graphdef, params = nnx.split(model)

    def decode(params: Any, latents: jax.Array) -> jax.Array:
        # SCALE, not the folder's scaling_factor: it undoes exactly what ``decode`` applied.
        return jnp.clip(vae_lib.decode(graphdef, params, latents / SCALE), -1.0, 1.0)

    return decode, params
