"""The training input pipeline: grain over TFDS array_record data sources.

Any dataset is a TFDS array_record directory ``data_dir/<tfds_name>/<version>`` plus a small
``decode`` function that turns stacked stored records into ``{"image": f32 [n, H, W, C],
"label": i32 [n], ...}``. The registry ``DATASETS`` maps the config's dataset name to that pair;
everything else (shuffle, sharding, flip, batching, prefetch, iterator state) is shared.

Element order. With ``N`` training records and global batch size ``B``, global element ``i`` is
record ``perm_e[i mod N]`` where ``e = i // N`` is its epoch and ``perm_e`` a permutation drawn
from ``(seed, e)``: every epoch is reshuffled, and each record appears once per epoch. Global
batch ``k`` holds elements ``kB .. kB+B-1``; process ``p`` of ``P`` reads only elements
``kB + p*B/P .. kB + (p+1)*B/P - 1``. So the processes' shares are disjoint, and their
concatenation in process order is the same global batch for every ``P``. Flips are drawn per
global batch from ``(seed, k)`` and sliced the same way, so they do not depend on ``P`` either.

Batches are gathered with one vectorized read and decode per batch rather than per element:
on this 2-core CPU grain's per-element shuffle, map and batch took about 19 ms per batch of 64
digits (its index shuffle alone about 70 us per element), against 0.7 ms here, and a digits
training step is about 90 ms. grain provides the iteration, reader threads, worker processes and
the checkpointable iterator state.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from tread_jax.cache import cache_root
from tread_jax.data import digits, latents


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How to find and decode one dataset.

    ``decode`` maps stacked records (a dict of arrays with a leading batch axis, one per stored
    feature) to ``{"image": f32 [n, H, W, C], "label": i32 [n], ...}``; pixel data comes out in
    [-1, 1]. ``prepare`` builds the dataset into a data_dir when it can be made locally (the
    embedded digits); ``None`` means the user must prepare it, and ``prepare_hint`` is the one
    line that says how.
    """

    tfds_name: str
    version: str
    decode: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    pixel_space: bool  # horizontal flips are meaningful only for pixel data
    prepare: Callable[[str], None] | None
    prepare_hint: str


# Config name -> dataset: the embedded digits, and ImageNet SD-VAE latents (imagenet256_latents,
# imagenet512_latents) made by ``python -m tread_jax.data.prepare_latents``.
DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(
        tfds_name=digits.TFDS_NAME,
        version=digits.VERSION,
        decode=digits.decode,
        pixel_space=True,
        prepare=digits.prepare,
        prepare_hint="it is prepared automatically from scikit-learn on first use",
    ),
    **{
        latents.dataset_name(resolution): DatasetSpec(**latents.spec_kwargs(resolution))
        for resolution in latents.RESOLUTIONS
    },
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about a dataset before building a model."""

    name: str
    image_shape: tuple[int, int, int]  # (H, W, C) of the decoded "image"
    num_classes: int
    num_train: int
    num_test: int  # 0 when the dataset has no test split


def default_config() -> ml_collections.ConfigDict:
    """The data config for the embedded digits.

    ``flip`` is off: digits are not mirror symmetric, so a flipped 2 is not a 2. ``worker_count``
    0 reads in the calling process (threads only), which works everywhere including tests;
    worker processes need absl flags parsed and a ``__main__`` guard.
    """
    config = ml_collections.ConfigDict()
    config.name = "digits"
    # Unset (None): default_data_dir(). A typed placeholder, so --config.data.data_dir=DIR works.
    config.data_dir = ml_collections.config_dict.placeholder(str)
    config.flip = False
    config.worker_count = 0  # grain worker processes (mp_prefetch); 0 = none
    config.num_threads = 1  # reader threads per process
    config.prefetch_buffer_size = 4  # per-process batches read ahead
    # Hold the train split in memory as arrays instead of parsing TFDS records (about 150 us
    # each) for every batch. Right for the tiny digits; off for large data.
    config.in_memory = True
    return config


def default_data_dir() -> str:
    """``$TREAD_JAX_CACHE/tensorflow_datasets``, or ``~/.cache/tread_jax/tensorflow_datasets``."""
    return str(cache_root() / "tensorflow_datasets")


def _spec(data_config: ml_collections.ConfigDict) -> DatasetSpec:
    if data_config.name not in DATASETS:
        raise ValueError(
            f"unknown dataset {data_config.name!r}; known datasets: {', '.join(sorted(DATASETS))}"
        )
    return DATASETS[data_config.name]


def _open_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The prepared dataset's read-only builder; prepares it first when the spec can."""
    spec = _spec(data_config)
    data_dir = data_config.data_dir or default_data_dir()
    path = Path(data_dir) / spec.tfds_name / spec.version
    # TFDS writes into a temporary directory and renames it into place when done, so a
    # dataset_info.json at the final path means the dataset is complete.
    if not (path / "dataset_info.json").exists():
        if spec.prepare is None:
            raise FileNotFoundError(
                f"dataset {data_config.name!r} not found at {path}: {spec.prepare_hint}"
            )
        spec.prepare(data_dir)
    return tfds.builder_from_directory(os.fspath(path))


class _RecordReader:
    """Reads stacked records straight from a TFDS array_record data source."""

    def __init__(self, source: Any):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        records = self._source.__getitems__([int(i) for i in indices])
        return {key: np.stack([r[key] for r in records]) for key in records[0]}


class _InMemoryReader:
    """A whole split read once into one array per (flat) feature."""

    def __init__(self, source: Any):
        self._arrays = _RecordReader(source).read(range(len(source)))
        self._length = len(source)

    def __len__(self) -> int:
        return self._length

    def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        return {key: array[np.asarray(indices)] for key, array in self._arrays.items()}


def dataset_info(data_config: ml_collections.ConfigDict) -> DatasetInfo:
    """Shapes, class count and split sizes of the configured dataset (prepares digits if needed)."""
    spec = _spec(data_config)
    builder = _open_builder(data_config)
    splits = builder.info.splits
    first = spec.decode(_RecordReader(builder.as_data_source(split="train")).read([0]))
    return DatasetInfo(
        name=data_config.name,
        image_shape=tuple(int(d) for d in first["image"].shape[1:]),
        num_classes=int(builder.info.features["label"].num_classes),
        num_train=int(splits["train"].num_examples),
        num_test=int(splits["test"].num_examples) if "test" in splits else 0,
    )


def split_reader(
    data_config: ml_collections.ConfigDict, split: str
) -> tuple[Callable[[Sequence[int]], dict[str, np.ndarray]], int]:
    """``(read, size)``: ``read(indices)`` decodes those records of a split (stored order)."""
    spec = _spec(data_config)
    builder = _open_builder(data_config)
    if split not in builder.info.splits:
        raise ValueError(
            f"dataset {data_config.name!r} has no split {split!r}; "
            f"splits: {', '.join(sorted(builder.info.splits))}"
        )
    reader = _RecordReader(builder.as_data_source(split=split))
    return (lambda indices: spec.decode(reader.read(indices))), len(reader)


def pixel_decoder(data_config: ml_collections.ConfigDict) -> tuple[
        Callable[[Any, jax.Array], jax.Array] | None, Any]:
    """``(decode(params, x) -> pixels in [-1, 1], params)`` for latent datasets, (None, ()) for
    pixel datasets. ``decode`` is pure, for use inside a jitted sampler or feature program."""
    if DATASETS[data_config.name].pixel_space:
        return None, ()
    from tread_jax import vae as vae_lib  # pylint: disable=g-import-not-at-top  # heavy, optional

    return latents.vae_decoder(data_config.get("vae") or vae_lib.SD_VAE_REPO)


def load_split_arrays(
    data_config: ml_collections.ConfigDict, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """All decoded images (f32 [N, H, W, C]) and labels (i32 [N]) of a split, in stored order.

    Meant for small data: the digits quality report and evaluation reference statistics.
    """
    read, size = split_reader(data_config, split)
    batch = read(range(size))
    return batch["image"], batch["label"]


# Stream ids keep the shuffle and the flips independent although both derive from one seed.
_SHUFFLE_STREAM, _FLIP_STREAM = 0, 1


@functools.lru_cache(maxsize=4)  # batches rarely span more than two epochs; threads share it
def _epoch_permutation(seed: int, epoch: int, num_records: int) -> np.ndarray:
    return np.random.default_rng((seed, _SHUFFLE_STREAM, epoch)).permutation(num_records)


class _ProcessBatches:
    """Random-access sequence: item ``k`` is this process's share of global batch ``k``.

    Endless (length ``sys.maxsize``); see the module docstring for the order. Wrapped in a grain
    MapDataset so grain's iterator state (the next ``k``) is all a checkpoint needs.
    """

    def __init__(
        self,
        reader: _RecordReader | _InMemoryReader,
        decode: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
        *,
        seed: int,
        global_batch_size: int,
        process_index: int,
        process_count: int,
        flip: bool,
    ):
        self._reader = reader
        self._decode = decode
        self._seed = seed
        self._global_batch_size = global_batch_size
        self._batch_size = global_batch_size // process_count
        self._offset = process_index * self._batch_size
        self._flip = flip

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        start = k * self._global_batch_size + self._offset
        epochs, positions = np.divmod(np.arange(start, start + self._batch_size), len(self._reader))
        indices = np.empty_like(positions)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            perm = _epoch_permutation(self._seed, int(epoch), len(self._reader))
            indices[in_epoch] = perm[positions[in_epoch]]
        batch = self._decode(self._reader.read(indices))
        if self._flip:
            rng = np.random.default_rng((self._seed, _FLIP_STREAM, k))
            flips = rng.random(self._global_batch_size) < 0.5
            flips = flips[self._offset : self._offset + self._batch_size]
            image = batch["image"]
            batch["image"] = np.where(flips[:, None, None, None], image[:, :, ::-1], image)
        return batch


def _with_images(
    decode: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], records: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``decode`` plus the stored clean crops, decoded to uint8."""
    return {**decode(records), latents.IMAGE_FEATURE: latents.decode_images(records[latents.IMAGE_FEATURE])}


def create_train_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
    repa_images: bool = False,
) -> grain.DatasetIterator:
    """An endless iterator over this process's share of each shuffled global batch.

    Yields ``{"image": f32 [b, H, W, C], "label": i32 [b]}`` with ``b = global_batch_size //
    process_count`` (see the module docstring for the order); ``repa_images`` adds the stored
    clean crops, uint8 ``[b, res, res, 3]`` (``latents.IMAGE_FEATURE``), for REPA. ``get_state()`` returns a JSON-able
    dict; ``set_state()`` on a fresh iterator built with the same arguments continues with exactly
    the batches the saved one would have produced next.
    """
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} must be positive and divisible by the "
            f"process count {process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process index {process_index} not in [0, {process_count})")
    if not 0 <= seed < 2**63:
        raise ValueError(f"data seed {seed} must be in [0, 2**63)")
    if data_config.worker_count > 0 and not flags.FLAGS.is_parsed():
        raise RuntimeError(
            "worker_count > 0 needs absl flags parsed first (run under absl.app.run), because "
            "grain's worker processes read their options from them"
        )
    spec = _spec(data_config)
    if data_config.flip and not spec.pixel_space:
        raise ValueError(
            f"flip=True needs pixel data; dataset {data_config.name!r} is not in pixel space"
        )
    builder = _open_builder(data_config)
    decode = spec.decode
    if repa_images:
        if latents.IMAGE_FEATURE not in builder.info.features:
            how = ("REPA trains on the latent datasets" if spec.pixel_space
                   else f"{spec.prepare_hint} --store_images (into a new output_dir)")
            raise ValueError(f"REPA needs the clean images stored with the data, and {builder.data_dir} has none: {how}")
        decode = functools.partial(_with_images, spec.decode)
    source = builder.as_data_source(split="train")
    reader = _InMemoryReader(source) if data_config.in_memory else _RecordReader(source)
    batches = _ProcessBatches(
        reader,
        decode,
        seed=seed,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        flip=data_config.flip,
    )
    ds = grain.MapDataset.source(batches).to_iter_dataset(
        grain.ReadOptions(
            num_threads=data_config.num_threads,
            prefetch_buffer_size=data_config.prefetch_buffer_size,
        )
    )
    if data_config.worker_count > 0:
        # The state then also records the worker round-robin: restore with the same worker_count.
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.worker_count))
    return iter(ds)
