"""Public DiT checkpoints in diffusers' layout: find the files, read the config, import the weights.

A source is either a local diffusers folder (a pipeline folder with ``transformer/config.json``
and ``transformer/diffusion_pytorch_model.safetensors``, as ``DiTPipeline.save_pretrained`` and
the hub write it, or that ``transformer`` folder itself, as ``DiTTransformer2DModel.save_pretrained``
writes it), or one of the hub ids in ``HUB_CHECKPOINTS``, whose transformer files are fetched
once into ``<cache>/<owner>--<name>/transformer/`` (``tread_jax.cache``: checksummed download,
``$TREAD_JAX_CACHE``, ``HF_HUB_OFFLINE``). The weights are read with safetensors' numpy API (no
torch) and converted by ``models.convert``; ``model_builder.import_ema`` places them on the
devices for evaluation, and training starts from them through ``config.init_from``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from flax.nnx import traversals
from safetensors.numpy import load_file

from tread_jax import data
from tread_jax.cache import cache_root, fetch_files
from tread_jax.models import convert

# DiT-XL/2 at 256 and 512 pixels (Peebles & Xie 2023), the original weights in diffusers' layout.
HUB_CHECKPOINTS = ("facebook/DiT-XL-2-256", "facebook/DiT-XL-2-512")
HUB_URL = "https://huggingface.co/{repo}/resolve/main/{file}"
SUBFOLDER = "transformer"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
# Published digests to check downloads against. None: no digest could be confirmed from an
# authoritative source when this was written, so the first download's digest is recorded beside
# the file and every later use is checked against that record (trust on first use).
HUB_SHA256: dict[str, str | None] = {f"{SUBFOLDER}/{CONFIG_FILE}": None, f"{SUBFOLDER}/{WEIGHTS_FILE}": None}
# diffusers' DiT class, and the generic class the hub checkpoints were converted to (diffusers'
# scripts/convert_dit_to_diffusers.py), which is a DiT when its norm_type is "ada_norm_zero".
_TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")


def _is_dit_config(config: dict[str, Any]) -> bool:
    name = config.get("_class_name")
    return name == _TRANSFORMER_CLASSES[0] or (name == _TRANSFORMER_CLASSES[1] and config.get("norm_type") == "ada_norm_zero")


def _is_transformer_folder(path: Path) -> bool:
    """A folder whose config.json describes a diffusers DiT transformer."""
    try:
        return _is_dit_config(json.loads((path / CONFIG_FILE).read_text()))
    except (OSError, ValueError, AttributeError):
        return False


def is_diffusers_source(source: str) -> bool:
    """Whether ``source`` names a diffusers DiT (a hub id of ``HUB_CHECKPOINTS`` or a folder with
    a ``transformer`` subfolder or a DiT transformer config) rather than a training workdir."""
    if not source:
        return False
    path = Path(source).expanduser()
    return source in HUB_CHECKPOINTS or (path / SUBFOLDER).is_dir() or _is_transformer_folder(path)


def _unavailable(repo: str, folder: Path, reason: str) -> str:
    return (f"{repo} is not available offline ({reason}). Download {SUBFOLDER}/{CONFIG_FILE} and "
            f"{SUBFOLDER}/{WEIGHTS_FILE} from https://huggingface.co/{repo} into {folder}, "
            f"or pass a local diffusers folder instead.")


def fetch_hub_checkpoint(repo: str, cache_dir: str | os.PathLike | None = None, *, url: str = HUB_URL,
                         sha256: dict[str, str | None] | None = None) -> Path:
    """The cached folder of hub checkpoint ``repo`` (one of ``HUB_CHECKPOINTS``), its transformer
    files downloaded and checked when missing. ``url`` is a template with ``{repo}`` and ``{file}``;
    tests point it at file:// URLs."""
    if repo not in HUB_CHECKPOINTS:
        raise ValueError(f"unknown hub checkpoint {repo!r}; known: {', '.join(HUB_CHECKPOINTS)}")
    folder = (Path(cache_dir).expanduser() if cache_dir is not None else cache_root()) / repo.replace("/", "--")
    files = [f"{SUBFOLDER}/{CONFIG_FILE}", f"{SUBFOLDER}/{WEIGHTS_FILE}"]
    # The template keeps {file} for fetch_files; the repo is filled in here.
    fetch_files(folder, files, url.replace("{repo}", repo), HUB_SHA256 if sha256 is None else sha256,
                lambda reason: _unavailable(repo, folder, reason))
    return folder / SUBFOLDER


def resolve(source: str) -> Path:
    """The transformer folder of ``source`` holding both files; FileNotFoundError in one line naming
    the missing file and how to get it."""
    if source in HUB_CHECKPOINTS:
        return fetch_hub_checkpoint(source)
    path = Path(source).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"diffusers DiT folder not found: {source} (expected a folder with {SUBFOLDER}/{CONFIG_FILE} and "
            f"{SUBFOLDER}/{WEIGHTS_FILE}, or one of the hub ids {', '.join(HUB_CHECKPOINTS)})")
    folder = path if (path / CONFIG_FILE).is_file() and not (path / SUBFOLDER).is_dir() else path / SUBFOLDER
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            # Older diffusers folders hold torch pickles only; diffusers rewrites them as safetensors.
            convert_hint = (f"; convert its .bin once with diffusers: DiTTransformer2DModel.from_pretrained('{folder}')"
                            f".save_pretrained('{folder}')" if (folder / "diffusion_pytorch_model.bin").is_file() else "")
            raise FileNotFoundError(
                f"{folder / name} not found: a diffusers DiT folder needs {CONFIG_FILE} and {WEIGHTS_FILE} "
                f"(DiTTransformer2DModel.save_pretrained writes them; the public ones are in the "
                f"{SUBFOLDER}/ folder of https://huggingface.co/{HUB_CHECKPOINTS[0]}){convert_hint}")
    return folder


def read_config(folder: Path) -> dict[str, Any]:
    """The diffusers transformer config of a ``resolve``d folder."""
    config = json.loads((folder / CONFIG_FILE).read_text())
    if not isinstance(config, dict) or not _is_dit_config(config):
        raise ValueError(f"{folder / CONFIG_FILE} does not describe a diffusers DiT ({_TRANSFORMER_CLASSES[0]}, or "
                         f"{_TRANSFORMER_CLASSES[1]} with norm_type 'ada_norm_zero')")
    return config


def dataset_info(folder: Path, dataset: str) -> data.DatasetInfo:
    """What the model was trained on, as far as sampling needs it: the latent shape and class count
    of the checkpoint's config, under the configured dataset's name (which picks the decoder)."""
    config = read_config(folder)
    size, channels = int(config["sample_size"]), int(config["in_channels"])
    return data.DatasetInfo(name=dataset, image_shape=(size, size, channels),
                            num_classes=int(config["num_embeds_ada_norm"]), num_train=0, num_test=0)


def import_params(folder: Path, abstract_params: Any) -> Any:
    """The checkpoint's weights as numpy parameters with the structure and shapes of
    ``abstract_params`` (the configured model's); ValueError naming what differs."""
    _, params = convert.params_from_diffusers(load_file(str(folder / WEIGHTS_FILE)), read_config(folder))
    got = traversals.flatten_mapping(params)
    want = traversals.flatten_mapping(abstract_params)
    mismatched = convert.mismatched_parameters(want, got)
    if mismatched:
        raise ValueError(
            f"the configured model does not fit the checkpoint in {folder} (set config.model and the "
            f"objective to match it: DDPM's learned variance doubles the output channels): "
            f"{', '.join(mismatched[:5])}")
    return traversals.unflatten_mapping({path: np.asarray(got[path], np.float32) for path in want})
