"""ImageNet images for latent preparation: the file list, image reading and ADM's centre crop.

Two layouts are read, both giving the same list of ``ImageRef`` (byte ranges of encoded images)
in a fixed order, sorted by class then by file name, so every host derives the same list and
the same shard boundaries, and a restarted run sees the same list again:

- ``folder``: an image-folder tree ``<root>/train/<wnid>/*.JPEG``.
- ``tfds``: the TFDS ``imagenet2012`` manual download directory, i.e. the original
  ``ILSVRC2012_img_train.tar`` (a tar of one tar per class), read in place: the nested tars are
  indexed once and each image is read by its byte offset, so nothing is extracted to disk.

Class index = position of the wnid in sorted order, the convention of torchvision's
ImageFolder, TFDS ``imagenet2012`` and the ADM/DiT code.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
TFDS_TRAIN_TAR = "ILSVRC2012_img_train.tar"


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """One encoded image: ``size`` bytes at ``offset`` in ``path`` (size -1: the whole file)."""

    path: str
    offset: int
    size: int
    label: int
    name: str  # for logs: the file path, or "<tar>:<class tar>/<member>"

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read() if self.size < 0 else f.read(self.size)


def list_image_folder(root: str | os.PathLike) -> tuple[list[ImageRef], list[str]]:
    """Images of ``<root>/train/<wnid>/`` and the sorted wnids; FileNotFoundError if absent."""
    train = Path(root) / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"no image-folder tree at {train} (expected {train}/<wnid>/*.JPEG)")
    classes = sorted(entry.name for entry in os.scandir(train) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"{train} has no class folders")
    refs = []
    for label, wnid in enumerate(classes):
        names = sorted(
            entry.name
            for entry in os.scandir(train / wnid)
            if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES)
        )
        refs += [ImageRef(os.fspath(train / wnid / n), 0, -1, label, os.fspath(train / wnid / n)) for n in names]
    return refs, classes


def list_imagenet_tar(manual_dir: str | os.PathLike) -> tuple[list[ImageRef], list[str]]:
    """Images inside TFDS's manual-download ``ILSVRC2012_img_train.tar`` and the sorted wnids."""
    path = Path(manual_dir) / TFDS_TRAIN_TAR
    if not path.is_file():
        raise FileNotFoundError(f"{TFDS_TRAIN_TAR} not found in {manual_dir} (the TFDS imagenet2012 manual_dir)")
    found: dict[str, list[tuple[str, int, int]]] = {}
    # The outer tar is opened seekable ("r:"), so listing skips over image data instead of reading it.
    with tarfile.open(path, "r:") as outer:
        for member in outer:
            if not (member.isfile() and member.name.endswith(".tar")):
                continue
            wnid = Path(member.name).stem
            with tarfile.open(fileobj=outer.extractfile(member), mode="r:") as inner:
                found[wnid] = [
                    (m.name, member.offset_data + m.offset_data, m.size)
                    for m in inner
                    if m.isfile() and m.name.lower().endswith(IMAGE_SUFFIXES)
                ]
    if not found:
        raise FileNotFoundError(f"{path} holds no per-class tars")
    classes = sorted(found)
    refs = [
        ImageRef(os.fspath(path), offset, size, label, f"{path}:{wnid}.tar/{name}")
        for label, wnid in enumerate(classes)
        for name, offset, size in sorted(found[wnid])
    ]
    return refs, classes


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion ``center_crop_arr``, also used by DiT): uint8 [s, s, 3].

    Halves the image with a BOX filter while its short side is at least twice the target,
    then resizes with BICUBIC so the short side equals the target, then crops the centre.
    """
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    return array[top : top + image_size, left : left + image_size]


def load_crop(ref: ImageRef, image_size: int) -> np.ndarray:
    """Decodes one image to RGB and centre-crops it; raises (PIL/OS errors) on corrupt data."""
    with Image.open(io.BytesIO(ref.read_bytes())) as image:
        # ImageNet holds some CMYK and grayscale JPEGs (and one PNG named .JPEG): all become RGB.
        return center_crop_arr(image.convert("RGB"), image_size)
