"""Encode ImageNet into SD-VAE latent moments, on every device of every host, resumably.

    python -m tread_jax.data.prepare_latents --source=folder --data_dir=/data/imagenet \\
        --resolution=256 --vae=stabilityai/sd-vae-ft-ema --output_dir=~/.cache/tread_jax/tensorflow_datasets

``--source=folder`` reads ``<data_dir>/train/<wnid>/*.JPEG``; ``--source=tfds`` reads the TFDS
``imagenet2012`` manual directory (``<data_dir>/ILSVRC2012_img_train.tar``) in place. Each image
gets ADM's centre crop; with ``--flip`` (default) its mirror image is encoded too. Output: the
TFDS array_record dataset ``<output_dir>/imagenet<res>_latents/1.0.0`` (see ``latents``), which
training reads with ``--config.data.data_dir=<output_dir>``.

Work split. The sorted image list is cut into shards of ``--shard_size`` consecutive images;
process ``p`` of ``P`` (multi-host: ``--distributed``, or ``--coordinator_address`` with
``--num_processes`` and ``--process_id``) owns a contiguous block of shards and writes them itself. Within a process, each batch is split over all local devices (a 1-D mesh;
the last batch is padded). Host threads decode and crop the next batches while the devices
encode the current one.

Resuming. A shard is written under a temporary name, its summary (record count, unreadable
files) is saved beside it, and the shard is then renamed to its final name: a final name means
a complete shard, and a restart skips those. ``prepare_manifest.json`` pins the settings and
the image list; a restart with different ones is refused. When every shard exists, process 0
writes TFDS's metadata, which is what marks the dataset as ready for training.

``--store_images`` also stores each centre crop (and each mirror) as PNG bytes in its record,
for REPA's encoder (``latents``): 66-114 KiB per 256 px crop of four sample photos, against
16 KiB of latents per record (ImageNet's total not measured).

Unreadable or corrupt images are logged by path, counted, listed in ``failed_images.txt`` and
skipped.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
import tqdm
from absl import app, flags, logging
from array_record.python import array_record_module
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tread_jax import cli, host_allocator
from tread_jax import vae as vae_lib
from tread_jax.data import imagenet, latents
from tread_jax.data.pipeline import default_data_dir

MANIFEST = "prepare_manifest.json"
FAILED_LIST = "failed_images.txt"
SPLIT = "train"
_BATCH_AXIS = "batch"


@dataclasses.dataclass(frozen=True)
class Summary:
    """What one call of ``prepare`` did."""

    dataset_dir: str
    num_shards: int
    shards_written: int  # by this call, this process
    shards_skipped: int  # already complete, this process
    images_encoded: int  # by this call, this process
    failed: tuple[str, ...]  # unreadable images met by this call, this process
    complete: bool  # every shard exists and the TFDS metadata is written
    seconds: float


def shard_path(dataset_dir: Path, name: str, shard: int, num_shards: int) -> Path:
    """TFDS's file name for one shard, so the builder finds the files without a custom template."""
    return dataset_dir / f"{name}-{SPLIT}.array_record-{shard:05d}-of-{num_shards:05d}"


def _summary_path(dataset_dir: Path, shard: int) -> Path:
    return dataset_dir / f"shard-{shard:05d}.json"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    tmp.replace(path)


def _list_images(source: str, data_dir: str) -> tuple[list[imagenet.ImageRef], list[str]]:
    if source == "folder":
        return imagenet.list_image_folder(data_dir)
    if source == "tfds":
        return imagenet.list_imagenet_tar(data_dir)
    raise ValueError(f"unknown --source {source!r}; expected 'folder' or 'tfds'")


def _check_manifest(dataset_dir: Path, manifest: dict) -> None:
    """Writes the manifest on a first run; on a restart, refuses settings that differ from it."""
    path = dataset_dir / MANIFEST
    if path.exists():
        previous = json.loads(path.read_text())
        changed = sorted(k for k in manifest.keys() | previous.keys() if previous.get(k) != manifest.get(k))
        if changed:
            raise ValueError(
                f"{dataset_dir} was started with different {', '.join(changed)}; use another "
                f"--output_dir or delete that directory to start over"
            )
    else:
        _write_atomic(path, json.dumps(manifest, indent=1))


def _make_encoder(vae: str, mesh: Mesh, flip: bool, compute_dtype: str):
    """jit(uint8 [B, r, r, 3] batch-sharded) -> float16 (mean, logvar[, mean_flip, logvar_flip])."""
    model, config = vae_lib.load_vae(vae, compute_dtype=jnp.dtype(compute_dtype))
    if config.latent_channels != latents.LATENT_CHANNELS or config.downsample_factor != latents.DOWNSAMPLE:
        raise ValueError(
            f"VAE {vae} maps to {config.latent_channels} channels at 1/{config.downsample_factor} "
            f"resolution; the latent datasets hold SD-VAE latents ({latents.LATENT_CHANNELS} channels, 1/8)"
        )
    graphdef, params = nnx.split(model)
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    batch = NamedSharding(mesh, PartitionSpec(_BATCH_AXIS))

    def encode(params, pixels):
        images = pixels.astype(jnp.float32) / 127.5 - 1.0
        views = [images, images[:, :, ::-1]] if flip else [images]
        out = []
        for view in views:
            mean, logvar = vae_lib.encode_moments(graphdef, params, view)
            out += [mean.astype(jnp.float16), logvar.astype(jnp.float16)]
        return tuple(out)

    jitted = jax.jit(encode, in_shardings=(None, batch), out_shardings=batch)
    return lambda pixels: jitted(params, jax.device_put(pixels, batch))


def _loaded_batches(
    refs: Sequence[imagenet.ImageRef], batch_size: int, resolution: int,
    pool: concurrent.futures.Executor, ahead: int,
) -> Iterator[tuple[list[imagenet.ImageRef], list[np.ndarray | None]]]:
    """Batches of (refs, crops or None for unreadable files), decoded ``ahead`` batches early."""

    def load(ref: imagenet.ImageRef) -> np.ndarray | None:
        try:
            return imagenet.load_crop(ref, resolution)
        except Exception as error:  # pylint: disable=broad-except  # any decoder failure = corrupt file
            logging.warning("skipping unreadable image %s: %s", ref.name, error)
            return None

    starts = range(0, len(refs), batch_size)
    queue: collections.deque = collections.deque()
    for start in starts:
        chunk = refs[start : start + batch_size]
        queue.append((chunk, [pool.submit(load, r) for r in chunk]))
        if len(queue) > ahead:
            chunk, futures = queue.popleft()
            yield chunk, [f.result() for f in futures]
    while queue:
        chunk, futures = queue.popleft()
        yield chunk, [f.result() for f in futures]


def _write_shard(
    path: Path, summary: Path, refs: Sequence[imagenet.ImageRef], encode, *, batch_size: int,
    resolution: int, features: tfds.features.FeaturesDict, pool: concurrent.futures.Executor,
    progress: tqdm.tqdm, flip: bool = True, store_images: bool = False,
) -> tuple[int, list[str]]:
    """Encodes one shard's images into ``path`` (temp name, then renamed); returns (records, failed)."""
    tmp = path.with_name(f".tmp-{path.name}")
    writer = array_record_module.ArrayRecordWriter(os.fspath(tmp), "group_size:1")
    records, failed = 0, []
    pending = None  # the previous batch: written while the devices encode the current one

    def views(crop: np.ndarray) -> list[bytes]:
        """PNG bytes of what each record of ``crop`` encodes: the crop, then its mirror."""
        return [latents.encode_png(view) for view in ([crop, crop[:, ::-1]] if flip else [crop])]

    def flush(chunk, crops, encoded, pngs) -> int:
        arrays = [np.asarray(a) for a in encoded]  # waits for the devices
        count = 0
        for i, (ref, crop) in enumerate(zip(chunk, crops)):
            if crop is None:
                continue
            stored = pngs[i].result() if store_images else [None] * (len(arrays) // 2)
            for mean, logvar, png in zip(arrays[0::2], arrays[1::2], stored):  # image, then its mirror
                record = {"mean": mean[i], "logvar": logvar[i], "label": ref.label}
                if store_images:
                    record[latents.IMAGE_FEATURE] = png
                writer.write(features.serialize_example(record))
                count += 1
        progress.update(len(chunk))
        return count

    for chunk, crops in _loaded_batches(refs, batch_size, resolution, pool, ahead=2):
        failed += [ref.name for ref, crop in zip(chunk, crops) if crop is None]
        pixels = np.zeros((batch_size, resolution, resolution, 3), np.uint8)  # padded to a fixed shape
        for i, crop in enumerate(crops):
            if crop is not None:
                pixels[i] = crop
        encoded = encode(pixels)  # dispatched asynchronously
        # PNG compression on the decoding threads, while the devices encode.
        pngs = [pool.submit(views, crop) if store_images and crop is not None else None for crop in crops]
        if pending is not None:
            records += flush(*pending)
        pending = (chunk, crops, encoded, pngs)
    if pending is not None:
        records += flush(*pending)
    writer.close()
    _write_atomic(summary, json.dumps({"num_examples": records, "num_images": len(refs), "failed": failed}))
    tmp.replace(path)  # the final name marks the shard complete
    return records, failed


def _finalize(dataset_dir: Path, name: str, num_shards: int, resolution: int, classes: Sequence[str],
              manifest: dict) -> bool:
    store_images = manifest.get("store_images", False)
    """Writes TFDS's metadata once every shard exists; returns whether the dataset is complete."""
    paths = [shard_path(dataset_dir, name, s, num_shards) for s in range(num_shards)]
    if not all(p.exists() for p in paths):
        return False
    summaries = [json.loads(_summary_path(dataset_dir, s).read_text()) for s in range(num_shards)]
    failed = [f for s in summaries for f in s["failed"]]
    _write_atomic(dataset_dir / FAILED_LIST, "".join(f + "\n" for f in failed))
    tfds.folder_dataset.write_metadata(
        data_dir=os.fspath(dataset_dir),
        features=latents.features(resolution, classes, images=store_images),
        split_infos=[tfds.core.SplitInfo(
            name=SPLIT,
            shard_lengths=[s["num_examples"] for s in summaries],
            num_bytes=sum(p.stat().st_size for p in paths),
        )],
        check_data=False,  # the check reads through TensorFlow, which is not a dependency
        description=(
            f"ImageNet {SPLIT} encoded by the SD VAE at {resolution}x{resolution} (ADM centre crop"
            f"{', plus horizontal mirrors' if manifest['flip'] else ''}): latent mean and log-variance, "
            f"float16{'; the crops as PNG' if store_images else ''}. VAE: {manifest['vae']}. {len(failed)} unreadable images skipped ({FAILED_LIST})."
        ),
    )
    return True


def prepare(
    *, source: str, data_dir: str, vae: str, resolution: int, output_dir: str, flip: bool = True,
    batch_size: int = 64, shard_size: int = 4096, num_workers: int = 0, max_shards: int = 0,
    vae_dtype: str = "float32", store_images: bool = False,
) -> Summary:
    """Encodes this process's shards (see the module docstring); safe to call again to resume.

    ``batch_size`` is per process and rounded up to a multiple of the local device count.
    ``num_workers`` decoding threads (0: one per CPU). ``max_shards`` > 0 stops after writing
    that many shards in this call (to split the work into jobs, or to test resuming).
    ``store_images`` also stores the crops (PNG) for REPA.
    """
    if resolution % (2 * latents.DOWNSAMPLE) or resolution < 2 * latents.DOWNSAMPLE:
        raise ValueError(f"--resolution {resolution} must be a positive multiple of {2 * latents.DOWNSAMPLE}")
    if batch_size <= 0 or shard_size <= 0 or max_shards < 0:
        raise ValueError("--batch_size and --shard_size must be positive and --max_shards >= 0")
    started = time.perf_counter()
    refs, classes = _list_images(source, data_dir)
    name = latents.dataset_name(resolution)
    dataset_dir = Path(output_dir).expanduser() / name / latents.VERSION
    num_shards = -(-len(refs) // shard_size)
    listing = hashlib.sha256("\n".join(f"{r.name}\t{r.label}" for r in refs).encode()).hexdigest()
    manifest = dict(source=source, vae=str(vae), vae_dtype=vae_dtype, resolution=resolution, flip=flip,
                    shard_size=shard_size, num_images=len(refs), num_shards=num_shards, classes=classes,
                    image_list_sha256=listing)
    if store_images:  # absent otherwise, so that runs started before the option still resume
        manifest["store_images"] = True
    process, processes = jax.process_index(), jax.process_count()
    if process == 0:
        dataset_dir.mkdir(parents=True, exist_ok=True)
        _check_manifest(dataset_dir, manifest)
    _sync(processes, "manifest")
    if process != 0:
        _check_manifest(dataset_dir, manifest)

    mine = range(process * num_shards // processes, (process + 1) * num_shards // processes)
    todo = [s for s in mine if not shard_path(dataset_dir, name, s, num_shards).exists()]
    if max_shards:
        todo = todo[:max_shards]
    skipped = sum(1 for s in mine if shard_path(dataset_dir, name, s, num_shards).exists())
    written, encoded, failed = 0, 0, []
    if todo:
        devices = jax.local_devices()
        batch_size = -(-batch_size // len(devices)) * len(devices)
        encode = _make_encoder(vae, Mesh(np.array(devices), (_BATCH_AXIS,)), flip, vae_dtype)
        features = latents.features(resolution, classes, images=store_images)
        shard_refs = {s: refs[s * shard_size : (s + 1) * shard_size] for s in todo}
        total = sum(len(r) for r in shard_refs.values())
        logging.info("process %d/%d: %d of its %d shards to write (%d images) on %d %s device(s)",
                     process, processes, len(todo), len(mine), total, len(devices), devices[0].platform)
        with concurrent.futures.ThreadPoolExecutor(num_workers or os.cpu_count()) as pool, tqdm.tqdm(
            total=total, unit="img", desc=f"{name} p{process}", smoothing=0.05, dynamic_ncols=True
        ) as progress:
            for s in todo:
                _, shard_failed = _write_shard(
                    shard_path(dataset_dir, name, s, num_shards), _summary_path(dataset_dir, s),
                    shard_refs[s], encode, batch_size=batch_size, resolution=resolution,
                    features=features, pool=pool, progress=progress, flip=flip, store_images=store_images,
                )
                written += 1
                encoded += len(shard_refs[s]) - len(shard_failed)
                failed += shard_failed
    _sync(processes, "shards")
    complete = (dataset_dir / "dataset_info.json").exists()
    if process == 0 and not complete:
        complete = _finalize(dataset_dir, name, num_shards, resolution, classes, manifest)
    return Summary(os.fspath(dataset_dir), num_shards, written, skipped, encoded, tuple(failed), complete,
                   time.perf_counter() - started)


def _sync(processes: int, tag: str) -> None:
    """A barrier across hosts (multi-host jobs share one output directory)."""
    if processes > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

        multihost_utils.sync_global_devices(f"prepare_latents_{tag}")


_SOURCE = flags.DEFINE_enum("source", "folder", ["folder", "tfds"],
                            "folder: <data_dir>/train/<wnid>/*.JPEG; tfds: the imagenet2012 manual dir.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "ImageNet root (folder) or TFDS manual_dir (tfds).")
_VAE = flags.DEFINE_string("vae", vae_lib.SD_VAE_REPO, "Diffusers VAE folder, or stabilityai/sd-vae-ft-ema.")
_RESOLUTION = flags.DEFINE_integer("resolution", 256, "Pixel size of the centre crop (256 or 512 for training).")
_FLIP = flags.DEFINE_bool("flip", True, "Also encode the horizontal mirror of every image.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "TFDS data_dir to write into (default: tread_jax's cache).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images per encoder call per process.")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 4096, "Source images per output shard.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "Image decoding threads (0: one per CPU).")
_MAX_SHARDS = flags.DEFINE_integer("max_shards", 0, "Stop after writing this many shards (0: all).")
_VAE_DTYPE = flags.DEFINE_enum("vae_dtype", "float32", ["float32", "bfloat16"], "VAE compute dtype.")
_STORE_IMAGES = flags.DEFINE_bool("store_images", False, "Also store each crop as PNG (needed to train with REPA).")
cli.define_multihost_flags()
flags.adopt_module_key_flags(cli)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _DATA_DIR.value:
        raise app.UsageError("--data_dir is required")
    cli.initialize_distributed()
    with cli.user_errors():  # missing input, wrong VAE folder or changed settings
        summary = prepare(
            source=_SOURCE.value, data_dir=_DATA_DIR.value, vae=_VAE.value, resolution=_RESOLUTION.value,
            output_dir=_OUTPUT_DIR.value or default_data_dir(), flip=_FLIP.value, batch_size=_BATCH_SIZE.value,
            shard_size=_SHARD_SIZE.value, num_workers=_NUM_WORKERS.value, max_shards=_MAX_SHARDS.value,
            vae_dtype=_VAE_DTYPE.value, store_images=_STORE_IMAGES.value,
        )
    rate = summary.images_encoded / max(summary.seconds, 1e-9)
    print(f"process {jax.process_index()}: wrote {summary.shards_written} shards, skipped "
          f"{summary.shards_skipped} complete ones, encoded {summary.images_encoded} images "
          f"({rate:.1f} img/s), {len(summary.failed)} unreadable (logged above)", flush=True)
    if summary.complete:
        print(f"dataset ready: {summary.dataset_dir}", flush=True)
    elif jax.process_index() == 0:
        print(f"{summary.dataset_dir}: not all {summary.num_shards} shards are written yet; "
              f"run the same command again to continue", flush=True)


if __name__ == "__main__":
    host_allocator.reexec_with_reusable_heap()
    cli.run(main, "prepare_latents")
