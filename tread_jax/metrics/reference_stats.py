"""Reference statistics for FID/sFID: from any dataset the pipeline reads, or an ADM image batch.

    python -m tread_jax.metrics.reference_stats --config=configs/imagenet256.py \\
        --config.data.data_dir=/data/tfds --split=train --num_examples=50000 \\
        --output=/data/imagenet256_train_stats.npz

reads the first ``num_examples`` records of the split in stored order (TFDS array_record
shards; for a random subset of a sorted split, prepare the dataset shuffled), decodes latent
datasets to pixels with the config's VAE (``config.data.vae``; pixel datasets are used as they
are), runs the FID Inception sharded over every device and host through the evaluator's ``run``
loop, and writes an ADM-format ``.npz`` with ``mu``/``sigma`` (pool) and ``mu_s``/``sigma_s``
(spatial), plus ``pr_features``: pool features of the first ``--pr_samples`` images for
precision/recall (an extra key that ADM's tools ignore). ``--adm_images=batch.npz`` computes
the same from an ADM batch of uint8 images (e.g. ``VIRTUAL_imagenet256_labeled.npz``) instead.

Note: for a latent dataset the images are VAE reconstructions of the originals, so their
statistics differ from ADM's reference batch; use that batch for numbers comparable to papers.

``--output`` and the cache of computed statistics may be ``gs://`` URLs; the image batches read
(``--adm_images``, an evaluation's ``--reference``) are local files (a gcsfuse mount works).
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from tread_jax import cli, host_allocator, paths, sharding
from tread_jax.data import pipeline
from tread_jax.metrics import evaluator, fid

PR_FEATURES = "pr_features"


def dataset_images_fn(data_config: ml_collections.ConfigDict, split: str,
                      mesh: jax.sharding.Mesh) -> tuple[Callable[[np.ndarray], jax.Array], int]:
    """``images_fn`` for ``evaluator.run`` over a split in stored order, and the split's size.

    Each process reads only its share of every global batch (padding indices past the end
    read the last record; ``run`` ignores those rows).
    """
    read, size = pipeline.split_reader(data_config, split)
    decode, decoder_params = pipeline.pixel_decoder(data_config)
    batch = sharding.batch_sharding(mesh)
    if decode is not None:
        decoder_params = jax.device_put(decoder_params, sharding.replicated(mesh))
        decode = jax.jit(decode, in_shardings=(sharding.replicated(mesh), batch),
                         out_shardings=batch)

    def images_fn(indices: np.ndarray) -> jax.Array:
        share = len(indices) // jax.process_count()
        mine = indices[jax.process_index() * share:(jax.process_index() + 1) * share]
        local = read(np.minimum(mine, size - 1))["image"]
        x = jax.make_array_from_process_local_data(batch, local,
                                                   (len(indices), *local.shape[1:]))
        return x if decode is None else decode(decoder_params, x)

    return images_fn, size


def adm_images_fn(path: str | os.PathLike, global_batch_size: int,
                  mesh: jax.sharding.Mesh) -> tuple[Callable[[np.ndarray], jax.Array], int]:
    """``images_fn`` over the uint8 images of an ADM batch, read in chunks (never all at once),
    and their count. Batches must be asked for in order from index 0, as ``evaluator.run``
    does without a progress file."""
    count = fid.adm_images_shape(path)[0]
    chunks = fid.iter_adm_images(path, global_batch_size)
    position = {"next": 0}

    def images_fn(indices: np.ndarray) -> jax.Array:
        if indices[0] != position["next"]:
            raise ValueError(f"{path}: ADM images are read in order from the start")
        chunk = next(chunks)
        position["next"] += len(chunk)
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], len(indices) - len(chunk), 0)])
        # Exact inverse of evaluator.to_uint8: floor(u / 127.5 - 1) * 127.5 + 128) = u.
        return evaluator.global_array(padded.astype(np.float32) / 127.5 - 1.0, mesh)

    return images_fn, count


def compute_reference(images_fn: Callable[[np.ndarray], jax.Array], num_examples: int,
                      extractor: evaluator.InceptionExtractor, mesh: jax.sharding.Mesh,
                      global_batch_size: int) -> tuple[fid.ReferenceStatistics, np.ndarray]:
    """FID/sFID statistics and the precision/recall feature sample of ``num_examples`` images."""
    accs, _ = evaluator.run(images_fn, extractor, num_samples=num_examples,
                            global_batch_size=global_batch_size, mesh=mesh,
                            description="reference statistics")
    return extractor.statistics(accs), accs["pr_features"].values()


def write_reference(path: str | os.PathLike, stats: fid.ReferenceStatistics,
                    pr_features: np.ndarray | None) -> None:
    """ADM-format statistics, plus ``pr_features`` when given (process 0 writes)."""
    if jax.process_index() == 0:
        extra = {PR_FEATURES: pr_features} if pr_features is not None else None
        content = io.BytesIO()
        fid.write_adm_npz(content, stats=stats, extra=extra)
        paths.write_bytes(paths.absolute(path), content.getvalue())


def _members(path: str | os.PathLike) -> set[str]:
    with zipfile.ZipFile(path) as zf:
        return {name[:-len(".npy")] for name in zf.namelist()}


def load_reference(path: str | os.PathLike, model: Any, *, mesh: jax.sharding.Mesh,
                   global_batch_size: int, pr_samples: int, cache_dir: str | os.PathLike
                   ) -> tuple[fid.ReferenceStatistics, np.ndarray | None]:
    """Statistics and precision/recall features of a reference ``.npz`` for ``model``.

    Precomputed ``mu``/``sigma`` in the file are used as they are (for ADM's batches they come
    from ADM's own Inception graph). What the file lacks but can be computed from its images
    (statistics of an images-only batch, the precision/recall features) is computed once with
    ``model`` and cached in ``cache_dir``, keyed by the file's path, size and mtime and the
    settings. Without images, precision/recall is unavailable (None).
    """
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference batch not found: {path}")
    members = _members(path)
    if "mu" not in members and "arr_0" not in members:
        raise ValueError(f"{path}: an ADM reference needs images (arr_0) or statistics (mu, sigma)")
    stats = fid.read_adm_statistics(path)
    features = None
    if PR_FEATURES in members:
        with np.load(path) as data:
            features = data[PR_FEATURES]
    if (stats is None or features is None) and "arr_0" in members:
        info = os.stat(path)
        key = hashlib.sha256(repr((path, info.st_size, info.st_mtime_ns, pr_samples,
                                   getattr(model, "preprocessing", None))).encode()).hexdigest()[:16]
        cache = os.path.join(cache_dir, f"{os.path.basename(path)[:-len('.npz')]}-{key}.npz")
        if not epath.Path(cache).exists():
            images_fn, count = adm_images_fn(path, global_batch_size, mesh)
            extractor = evaluator.InceptionExtractor(model, pr_samples=pr_samples)
            computed, pr = compute_reference(images_fn, count, extractor, mesh, global_batch_size)
            write_reference(cache, computed, pr)
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("tread_jax_reference_cache")
        cached = epath.Path(cache).read_bytes()
        stats = stats or fid.read_adm_statistics(io.BytesIO(cached))
        with np.load(io.BytesIO(cached)) as data:
            features = data[PR_FEATURES]
    return stats, features


# ----------------------------------------------------------------------------------------------
# Command


def _define_flags() -> None:
    from absl import flags  # pylint: disable=g-import-not-at-top

    cli.define_config_flag("Config whose data section names the dataset (or --adm_images).", required=False)
    cli.define_multihost_flags()
    flags.adopt_module_key_flags(cli)
    flags.DEFINE_string("split", "train", "Dataset split to read (stored order).")
    flags.DEFINE_integer("num_examples", 50_000, "Images to use (at most the split's size).")
    flags.DEFINE_string("adm_images", None, "Read this ADM .npz of uint8 images instead of a dataset.")
    flags.DEFINE_string("output", None, "Where to write the ADM-format statistics .npz.")
    flags.DEFINE_integer("per_device_batch", 32, "Images per device per batch.")
    flags.DEFINE_integer("pr_samples", evaluator.DEFAULT_PR_SAMPLES,
                         "Pool features kept for precision/recall.")
    flags.DEFINE_string("inception_weights", None, "pytorch-fid .pth (default: cache/download).")
    flags.DEFINE_enum("inception_preprocessing", "adm", ["adm", "pytorch_fid"],
                      "Resize/scaling convention of the Inception input.")
    flags.mark_flags_as_required(["output"])


def main(argv: list[str]) -> None:
    from absl import app, flags  # pylint: disable=g-import-not-at-top

    from tread_jax.metrics import inception  # pylint: disable=g-import-not-at-top

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if (f.config is None) == (f.adm_images is None):
        raise app.UsageError("give exactly one of --config (a dataset) and --adm_images")
    # Every host runs this command and reads its share of the images.
    cli.initialize_distributed()
    mesh = sharding.create_mesh({"data": -1, "fsdp": 1})
    batch = f.per_device_batch * jax.device_count()
    with cli.user_errors():  # missing weights, dataset or image batch: one line
        model = inception.load_inception(f.inception_weights, preprocessing=f.inception_preprocessing)
        if f.adm_images:
            images_fn, size = adm_images_fn(f.adm_images, batch, mesh)
        else:
            images_fn, size = dataset_images_fn(f.config.data, f.split, mesh)
    extractor = evaluator.InceptionExtractor(model, pr_samples=f.pr_samples)
    stats, pr = compute_reference(images_fn, min(f.num_examples, size), extractor, mesh, batch)
    write_reference(f.output, stats, pr)
    if jax.process_index() == 0:
        print(f"wrote statistics of {min(f.num_examples, size)} images to {f.output}")


if __name__ == "__main__":
    host_allocator.reexec_with_reusable_heap()
    _define_flags()
    cli.run(main, "tread_jax.metrics.reference_stats")
