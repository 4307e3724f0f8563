"""What a training workdir records about itself, so that sampling and evaluation need only it.

At the start of training the dataset's metadata (image shape, class count, split sizes, pixel
or latent space, the VAE and latent scale) goes to ``<workdir>/dataset.json``; restoring a
model for sampling reads it instead of opening the dataset, which a machine that only
evaluates may not have.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
from etils import epath

from tread_jax import data, paths
from tread_jax.data import latents

DATASET_FILE = "dataset.json"


def dataset_record(info: data.DatasetInfo, data_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``info`` plus how to turn samples into pixels: the JSON written into the workdir."""
    pixel_space = data.DATASETS[info.name].pixel_space
    return {
        **dataclasses.asdict(info),
        "pixel_space": pixel_space,
        "vae": None if pixel_space else data_config.get("vae", None),
        "latent_scale": None if pixel_space else latents.SCALE,
    }


def record_dataset(workdir: str, info: data.DatasetInfo, data_config: ml_collections.ConfigDict) -> None:
    """Writes ``<workdir>/dataset.json`` (process 0; replaced atomically)."""
    if jax.process_index() != 0:
        return
    paths.write_text(os.path.join(workdir, DATASET_FILE), json.dumps(dataset_record(info, data_config), indent=2))


def recorded_dataset(workdir: str) -> data.DatasetInfo | None:
    """The DatasetInfo recorded in ``workdir``; None for a workdir written before it was recorded."""
    path = epath.Path(workdir) / DATASET_FILE
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    fields = {f.name for f in dataclasses.fields(data.DatasetInfo)}
    values = {k: v for k, v in record.items() if k in fields}
    values["image_shape"] = tuple(values["image_shape"])
    return data.DatasetInfo(**values)


def dataset_info(config: ml_collections.ConfigDict, workdir: str) -> data.DatasetInfo:
    """The workdir's recorded dataset, else the configured dataset's own metadata."""
    return recorded_dataset(workdir) or data.dataset_info(config.data)
