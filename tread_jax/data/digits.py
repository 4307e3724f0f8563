"""scikit-learn's handwritten digits as a TFDS array_record dataset: the embedded default data.

``load_digits()`` ships 1797 real 8x8 grayscale digits (integer values 0..16, 10 classes) inside
scikit-learn, so the default config trains on real, class-labelled images with no download. They
are written once into a TFDS array_record dataset so that training reads them through exactly the
grain path that ImageNet latents use.

Fixed split: within each class, samples keep scikit-learn's order and every sixth one (rank
5, 11, 17, ... within its class) goes to ``test``, the rest to ``train``. This is stratified, needs no
random generator, and gives 1501 train / 296 test images.

Records: ``image`` uint8 [8, 8, 1] holding the raw 0..16 values (exact, no rescaling loss) and
``label`` ClassLabel(10). ``decode`` maps a record to the pipeline's float32 [-1, 1] format.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

TFDS_NAME = "sklearn_digits"
VERSION = "1.0.0"
IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
MAX_VALUE = 16  # load_digits() pixel values are integers in 0..MAX_VALUE
TEST_EVERY = 6  # every TEST_EVERY-th sample of each class is held out


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Returns the fixed stratified split as sorted indices into scikit-learn's sample order."""
    rank_in_class = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rank_in_class[members] = np.arange(len(members))
    is_test = rank_in_class % TEST_EVERY == TEST_EVERY - 1
    return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits with a fixed stratified train/test split."""

    VERSION = tfds.core.Version(VERSION)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS finds a packaged builder's file through the importlib_resources backport, which it
        # declares as a dependency only for Python < 3.9; the answer is simply this file.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo is built directly: dataset_info_from_configs looks for metadata files this
        # builder does not need.
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn load_digits(): 1797 8x8 grayscale digits, values 0..16.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=[str(d) for d in range(NUM_CLASSES)]),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        del dl_manager  # the data ships inside scikit-learn
        from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

        digits = load_digits()
        images = digits.images.astype(np.uint8)[..., None]
        labels = digits.target.astype(np.int64)
        return {
                split: self._generate_examples(images[idx], labels[idx], idx)
                for split, idx in split_indices(labels).items()
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray):
        # Keys are scikit-learn's sample indices, so the stored order is a fixed function of them.
        for image, label, index in zip(images, labels, indices):
            yield int(index), {"image": image, "label": int(label)}


def dataset_dir(data_dir: str | os.PathLike) -> Path:
    """Where the prepared digits live inside a TFDS data_dir."""
    return Path(data_dir) / TFDS_NAME / VERSION


def prepare(data_dir: str | os.PathLike) -> None:
    """Writes the digits dataset into ``data_dir`` unless it is there already.

    Safe when several processes (e.g. multi-host on one machine) call it at once: an exclusive
    ``flock`` on ``data_dir/.sklearn_digits.lock`` lets one process build while the others wait and
    then find the data. TFDS builds in a temporary directory and renames it into place, so readers
    never see a half-written dataset. On hosts that share a network filesystem without working
    ``flock``, prepare once beforehand (any call of this function, e.g. via ``dataset_info``).
    """
    os.makedirs(data_dir, exist_ok=True)
    with open(Path(data_dir) / f".{TFDS_NAME}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (dataset_dir(data_dir) / "dataset_info.json").exists():
                builder = SklearnDigits(data_dir=os.fspath(data_dir), file_format="array_record")
                builder.download_and_prepare()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def decode(records: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stacked records -> {"image": f32 [n, 8, 8, 1] in [-1, 1], "label": i32 [n]}."""
    image = records["image"].astype(np.float32) * (2.0 / MAX_VALUE) - 1.0
    return {"image": image, "label": records["label"].astype(np.int32)}
