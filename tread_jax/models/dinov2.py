"""DINOv2 (ViT-S/14, B/14, L/14, with or without registers) in Flax NNX: REPA's frozen encoder.

The network is Hugging Face ``transformers``' ``Dinov2Model`` / ``Dinov2WithRegistersModel``
(the port of github.com/facebookresearch/dinov2): a 14x14 patch embedding, a class token,
optional register tokens (after the class token, without position embeddings), pre-norm blocks
with LayerScale and exact GELU, and a final LayerNorm. ``DinoV2.__call__`` returns the final
layer-normed patch tokens, the features REPA aligns with (``x_norm_patchtokens``).

The model is built for one input size. Its position table, published for the 37x37 grid of
518x518 inputs, is resized to that size's grid once, at load time, in numpy, with torch's
bicubic ``F.interpolate`` reproduced exactly (``bicubic_resize_matrix``):

* ``antialias=None`` (default) does what ``transformers`` does at run time: a resize to the
  target size, without antialiasing for the plain models and with it for the models with
  registers. (The DINOv2 hub code's plain models instead pass a scale factor with a 0.1 offset;
  ``bicubic_resize_matrix(scale_factor=...)`` reproduces that kernel, the loader does not use it.)
* ``antialias=True`` is what REPA trains with: it resizes the table once with timm's
  ``resample_abs_pos_embed`` (bicubic, antialiased) for every DINOv2 variant, and then runs at
  that grid, so the hub code's run-time resize never happens.

Inputs are NHWC RGB images normalised with the ImageNet mean and std (``normalize_imagenet``).
Weights: ``load_dinov2("dinov2-vitb14")`` reads ``config.json`` and ``model.safetensors`` of
``facebook/dinov2-base`` from ``$TREAD_JAX_CACHE`` (default ``~/.cache/tread_jax``), downloading
them there on first use (checksummed; see ``tread_jax.cache.fetch_files``); a local folder with
those two files works too. The safetensors file is read with the numpy API: no torch at run time.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from tread_jax.cache import cache_root, fetch_files

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HF_URL = "https://huggingface.co/{repo}/resolve/main/{{file}}"

# Short names -> Hugging Face repositories of the published weights.
DINOV2_REPOS = {
    "dinov2-vits14": "facebook/dinov2-small",
    "dinov2-vitb14": "facebook/dinov2-base",
    "dinov2-vitl14": "facebook/dinov2-large",
    "dinov2-vits14-reg": "facebook/dinov2-with-registers-small",
    "dinov2-vitb14-reg": "facebook/dinov2-with-registers-base",
    "dinov2-vitl14-reg": "facebook/dinov2-with-registers-large",
}
# No digest could be confirmed from an authoritative source when this was written: the first
# download's digest is recorded beside each file and later uses are checked against it.
DINOV2_SHA256: dict[str, str | None] = {CONFIG_FILE: None, WEIGHTS_FILE: None}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DinoV2Config:
    """The fields of a ``transformers`` DINOv2 ``config.json`` that shape the network."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 14
    image_size: int = 518  # the grid the published position table is laid out for
    num_register_tokens: int = 0
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    layerscale_value: float = 1.0

    @property
    def pretrained_grid(self) -> int:
        return self.image_size // self.patch_size


def read_config(path: str | os.PathLike) -> DinoV2Config:
    """Reads a ``transformers`` DINOv2 ``config.json``; ValueError for variants not built here."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DINOv2 config not found: {path}")
    raw = json.loads(path.read_text())
    model_type = raw.get("model_type")
    if model_type not in ("dinov2", "dinov2_with_registers"):
        raise ValueError(f"{path}: model_type={model_type!r} is not a DINOv2 model")
    # The giant models' SwiGLU MLP and other activations are not implemented: refuse, not misload.
    if raw.get("use_swiglu_ffn", False) or raw.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{path}: only the GELU-MLP variants (S/14, B/14, L/14) are implemented")
    fields = {f.name for f in dataclasses.fields(DinoV2Config)}
    kwargs = {k: v for k, v in raw.items() if k in fields and v is not None}
    if model_type == "dinov2":
        kwargs["num_register_tokens"] = 0
    else:
        kwargs.setdefault("num_register_tokens", 4)  # the transformers default
    for key in ("image_size", "patch_size"):
        if isinstance(kwargs.get(key), (list, tuple)):
            if len(set(kwargs[key])) != 1:
                raise ValueError(f"{path}: non-square {key} {kwargs[key]} is not supported")
            kwargs[key] = kwargs[key][0]
    return DinoV2Config(**kwargs)


# ------------------------------------------------------------------------------------------------
# torch's bicubic interpolation, as resampling matrices.

def _cubic_keys(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter ``a`` at distances ``x``."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def bicubic_resize_matrix(in_size: int, out_size: int, *, antialias: bool = False,
                          scale_factor: float | None = None) -> np.ndarray:
    """float64 ``[out_size, in_size]`` matrix ``W`` with ``W @ x`` equal to torch's
    ``F.interpolate(x, mode="bicubic", align_corners=False, antialias=antialias)`` along one axis.

    torch's 2-D bicubic is separable, so ``W_h @ X @ W_w.T`` resizes a ``[H, W]`` plane. Without
    antialiasing torch samples Keys' kernel with a=-0.75 at ``(i + 0.5) * s - 0.5`` and clamps the
    four taps to the border; with it, it uses a=-0.5 stretched by ``s`` when downsampling and
    renormalised over the taps inside the input (PIL's scheme). ``s`` is ``in/out``, or
    ``1/scale_factor`` when torch is given a scale factor (its ``recompute_scale_factor=None``).
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")
    # torch computes the scale and the sampling positions in float32 for float32 inputs; their
    # rounding moves large resizes (256 -> 224) by about 1e-5, so it is reproduced here.
    scale = np.float32(in_size / out_size if scale_factor is None else 1.0 / scale_factor)
    weights = np.zeros((out_size, in_size))
    if not antialias:
        src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
        first = np.floor(src).astype(np.int64)
        t = (src - first).astype(np.float64)
        for tap in range(-1, 3):
            np.add.at(weights, (np.arange(out_size), np.clip(first + tap, 0, in_size - 1)),
                      _cubic_keys(t - tap, -0.75))
        return weights
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(out_size):
        center = scale * np.float32(i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = _cubic_keys((np.arange(lo, hi) - center + 0.5) * inv_scale, -0.5)
        total = taps.sum()
        weights[i, lo:hi] = taps / total if total != 0 else taps
    return weights


def resize_position_table(table: np.ndarray, grid: int, *, antialias: bool) -> np.ndarray:
    """``[1 + G*G, D]`` class + patch position table -> ``[1 + grid*grid, D]``, as torch would.

    The table is returned unchanged at its own grid (``transformers`` skips the resize there).
    """
    table = np.asarray(table, np.float32)
    old = math.isqrt(table.shape[0] - 1)
    if old * old != table.shape[0] - 1:
        raise ValueError(f"position table of {table.shape[0] - 1} patches is not a square grid")
    if old == grid:
        return table
    w = bicubic_resize_matrix(old, grid, antialias=antialias)
    patches = table[1:].astype(np.float64).reshape(old, old, -1)
    resized = np.einsum("ij,jkd,lk->ild", w, patches, w, optimize=True).reshape(grid * grid, -1)
    return np.concatenate([table[:1], resized.astype(np.float32)], axis=0)


def normalize_imagenet(images: jax.Array) -> jax.Array:
    """NHWC images in [-1, 1] (this package's pixel convention) -> ImageNet-normalised inputs."""
    mean, std = jnp.asarray(IMAGENET_MEAN), jnp.asarray(IMAGENET_STD)
    return ((images.astype(jnp.float32) + 1.0) * 0.5 - mean) / std


def resize_bicubic(images: jax.Array, size: int) -> jax.Array:
    """NHWC images -> ``[B, size, size, C]`` exactly as ``F.interpolate(x, size, mode="bicubic")``
    (no antialiasing): REPA's 256 -> 224 resize before DINOv2. The matrices are built at trace time."""
    _, h, w, _ = images.shape
    wh = jnp.asarray(bicubic_resize_matrix(h, size), jnp.float32)
    ww = jnp.asarray(bicubic_resize_matrix(w, size), jnp.float32)
    return jnp.einsum("ih,bhwc,jw->bijc", wh, images.astype(jnp.float32), ww,
                      precision=jax.lax.Precision.HIGHEST)


# ------------------------------------------------------------------------------------------------
# The network.

class Block(nnx.Module):
    """Pre-norm ViT block with LayerScale: ``x + g1 * attn(ln1(x))``, then ``+ g2 * mlp(ln2(x))``."""

    def __init__(self, cfg: DinoV2Config, dtype: Any, rngs: nnx.Rngs):
        d, hidden = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
        self.num_heads = cfg.num_attention_heads
        self.norm1 = _layer_norm(cfg, dtype, rngs)
        self.query = nnx.Linear(d, d, use_bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.key = nnx.Linear(d, d, use_bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.value = nnx.Linear(d, d, use_bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.proj = nnx.Linear(d, d, dtype=dtype, rngs=rngs)
        self.layer_scale1 = nnx.Param(jnp.full((d,), cfg.layerscale_value, jnp.float32))
        self.norm2 = _layer_norm(cfg, dtype, rngs)
        self.fc1 = nnx.Linear(d, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, d, dtype=dtype, rngs=rngs)
        self.layer_scale2 = nnx.Param(jnp.full((d,), cfg.layerscale_value, jnp.float32))

    def attention(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        heads = lambda t: t.reshape(b, n, self.num_heads, d // self.num_heads)  # noqa: E731
        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        logits = jnp.einsum("bqhc,bkhc->bhqk", q, k) * (d // self.num_heads) ** -0.5
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        return self.proj(jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, n, d))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.norm1(x)) * self.layer_scale1[...].astype(x.dtype)
        mlp = self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))
        return x + mlp * self.layer_scale2[...].astype(x.dtype)


class DinoV2(nnx.Module):
    """DINOv2 for ``image_size x image_size`` inputs; ``__call__`` gives the normed patch tokens.

    Parameters are float32; activations run in ``compute_dtype``. ``pos_embed`` holds the position
    table already resized to this input size's grid.
    """

    def __init__(self, config: DinoV2Config, *, image_size: int = 224, compute_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        if image_size % config.patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size "
                             f"{config.patch_size}")
        d, p = config.hidden_size, config.patch_size
        self.config = config
        self.image_size = image_size
        self.grid = image_size // p
        self.patch_embed = nnx.Linear(p * p * 3, d, dtype=compute_dtype, rngs=rngs)
        self.cls_token = nnx.Param(jnp.zeros((1, d), jnp.float32))
        self.register_tokens = (nnx.Param(jnp.zeros((config.num_register_tokens, d), jnp.float32))
                                if config.num_register_tokens else None)
        self.pos_embed = nnx.Param(jnp.zeros((1 + self.grid ** 2, d), jnp.float32))
        self.blocks = nnx.List([Block(config, compute_dtype, rngs) for _ in range(config.num_hidden_layers)])
        self.norm = _layer_norm(config, compute_dtype, rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        """``[B, S, S, 3]`` ImageNet-normalised images (S = ``image_size``) -> ``[B, grid**2, D]``."""
        size, p, g = self.image_size, self.config.patch_size, self.grid
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"DINOv2 built for NHWC [B, {size}, {size}, 3] images, got shape "
                             f"{tuple(images.shape)}")
        b = images.shape[0]
        # The stride-p convolution as a matmul over (row, column, channel)-flattened patches.
        patches = images.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * 3)
        x = self.patch_embed(patches.astype(self.patch_embed.dtype))
        dtype = x.dtype
        pos = self.pos_embed[...].astype(dtype)
        cls = jnp.broadcast_to(self.cls_token[...].astype(dtype) + pos[:1], (b, 1, x.shape[-1]))
        # Registers go after the class token, without position embeddings.
        registers = [] if self.register_tokens is None else [
            jnp.broadcast_to(self.register_tokens[...].astype(dtype), (b, *self.register_tokens[...].shape))]
        x = jnp.concatenate([cls, *registers, x + pos[1:]], axis=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 1 + self.config.num_register_tokens:])


def _layer_norm(cfg: DinoV2Config, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance, as torch computes it.
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=dtype,
                         use_fast_variance=False, rngs=rngs)


def features(graphdef: nnx.GraphDef, params: nnx.State, images: jax.Array) -> jax.Array:
    """Pure form of ``DinoV2.__call__`` over ``nnx.split(model)``, for jax.jit and shardings."""
    return nnx.merge(graphdef, params)(images)


# ------------------------------------------------------------------------------------------------
# Loading the published (transformers-layout) state dict.

def _layer_keys(i: int) -> dict[tuple[str, ...], str]:
    prefix = f"encoder.layer.{i}."
    names = {"norm1": "norm1", "query": "attention.attention.query", "key": "attention.attention.key",
             "value": "attention.attention.value", "proj": "attention.output.dense",
             "norm2": "norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    keys = {}
    for ours, theirs in names.items():
        weight = "scale" if ours.startswith("norm") else "kernel"
        keys[("blocks", i, ours, weight)] = prefix + theirs + ".weight"
        keys[("blocks", i, ours, "bias")] = prefix + theirs + ".bias"
    keys[("blocks", i, "layer_scale1")] = prefix + "layer_scale1.lambda1"
    keys[("blocks", i, "layer_scale2")] = prefix + "layer_scale2.lambda1"
    return keys


def _checkpoint_keys(config: DinoV2Config) -> dict[tuple, str]:
    """NNX parameter path -> published state-dict key (position table handled separately)."""
    keys = {("patch_embed", "kernel"): "embeddings.patch_embeddings.projection.weight",
            ("patch_embed", "bias"): "embeddings.patch_embeddings.projection.bias",
            ("cls_token",): "embeddings.cls_token",
            ("norm", "scale"): "layernorm.weight", ("norm", "bias"): "layernorm.bias"}
    if config.num_register_tokens:
        keys[("register_tokens",)] = "embeddings.register_tokens"
    for i in range(config.num_hidden_layers):
        keys.update(_layer_keys(i))
    return keys


def _to_flax(name: str, tensor: np.ndarray) -> np.ndarray:
    """Torch layout -> this module's: the patch conv [D, C, p, p] to [(p, p, C), D], linear
    weights [out, in] to [in, out], the class/register tokens without their batch axis."""
    if name == "embeddings.patch_embeddings.projection.weight":
        return tensor.transpose(2, 3, 1, 0).reshape(-1, tensor.shape[0])
    if name.endswith(".weight") and tensor.ndim == 2:
        return tensor.T
    if name in ("embeddings.cls_token", "embeddings.register_tokens", "embeddings.position_embeddings"):
        return tensor.reshape(tensor.shape[-2], tensor.shape[-1])
    return tensor


def dinov2_from_state_dict(tensors: dict[str, np.ndarray], config: DinoV2Config, *,
                           image_size: int = 224, antialias: bool | None = None,
                           compute_dtype: Any = jnp.float32, source: str = "state dict") -> DinoV2:
    """A ``DinoV2`` for ``image_size`` inputs from a published state dict; ValueError on any
    mismatch. ``antialias``: see the module docstring (None: as ``transformers`` does)."""
    if antialias is None:
        antialias = config.num_register_tokens > 0
    keys = _checkpoint_keys(config)
    wanted = set(keys.values()) | {"embeddings.position_embeddings"}
    # The mask token is used only in DINOv2's masked pre-training.
    unexpected = sorted(set(tensors) - wanted - {"embeddings.mask_token"})
    missing = sorted(wanted - set(tensors))
    if missing or unexpected:
        raise ValueError(f"{source} does not match DINOv2 {config}: missing keys {missing[:8]}; "
                         f"unexpected keys {unexpected[:8]}")
    pos_table = _to_flax("embeddings.position_embeddings", tensors["embeddings.position_embeddings"])
    if pos_table.shape != (1 + config.pretrained_grid ** 2, config.hidden_size):
        raise ValueError(f"{source}: position table {pos_table.shape} does not fit the "
                         f"{config.pretrained_grid}x{config.pretrained_grid} grid of {config}")
    model = nnx.merge(*_skeleton(config, image_size, compute_dtype))
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    loaded = {("pos_embed",): resize_position_table(pos_table, image_size // config.patch_size,
                                                    antialias=antialias)}
    for path, key in keys.items():
        loaded[path] = _to_flax(key, tensors[key])
    for path, array in loaded.items():
        if array.shape != tuple(flat[path].shape):
            raise ValueError(f"{source}: {keys.get(path, path)} has shape {array.shape}, the model "
                             f"expects {tuple(flat[path].shape)}")
    nnx.update(model, nnx.from_flat_state({p: jnp.asarray(a, jnp.float32) for p, a in loaded.items()}))
    return model


@functools.lru_cache(maxsize=4)
def _skeleton(config: DinoV2Config, image_size: int, compute_dtype: Any) -> tuple[nnx.GraphDef, nnx.State]:
    """The module structure with abstract parameters: the weights come from the file anyway."""
    abstract = nnx.eval_shape(lambda: DinoV2(config, image_size=image_size,
                                             compute_dtype=compute_dtype, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


def _offline_message(name: str, folder: Path, reason: str) -> str:
    return (f"{name} is not available offline ({reason}). Download {CONFIG_FILE} and {WEIGHTS_FILE} "
            f"from https://huggingface.co/{DINOV2_REPOS[name]} and place them in {folder}, "
            f"or pass a local folder with those files instead.")


def ensure_dinov2(name: str, cache_dir: str | os.PathLike | None = None, *, url: str | None = None,
                  sha256: dict[str, str | None] | None = None) -> Path:
    """Folder ``<cache>/<name>/`` holding the published files of ``name`` (a key of
    ``DINOV2_REPOS``), downloading what is missing; see ``tread_jax.cache.fetch_files``."""
    if name not in DINOV2_REPOS:
        raise ValueError(f"unknown DINOv2 model {name!r}; choose one of {sorted(DINOV2_REPOS)}")
    folder = (Path(cache_dir).expanduser() if cache_dir is not None else cache_root()) / name
    url = HF_URL.format(repo=DINOV2_REPOS[name]) if url is None else url
    return fetch_files(folder, (CONFIG_FILE, WEIGHTS_FILE), url,
                        DINOV2_SHA256 if sha256 is None else sha256,
                        functools.partial(_offline_message, name, folder))


def load_dinov2(name_or_path: str | os.PathLike = "dinov2-vitb14", *, image_size: int = 224,
                antialias: bool | None = None, compute_dtype: Any = jnp.float32,
                cache_dir: str | os.PathLike | None = None) -> tuple[DinoV2, DinoV2Config]:
    """DINOv2 for ``image_size`` inputs from a short name (``DINOV2_REPOS``: cache, then download)
    or a folder holding ``config.json`` and ``model.safetensors``."""
    if str(name_or_path) in DINOV2_REPOS:
        folder = ensure_dinov2(str(name_or_path), cache_dir)
    else:
        folder = Path(name_or_path).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"DINOv2 folder not found: {name_or_path} (expected a folder with "
                                    f"{CONFIG_FILE} and {WEIGHTS_FILE}, or one of {sorted(DINOV2_REPOS)})")
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / file).is_file():
            raise FileNotFoundError(f"{folder} lacks {file}: a DINOv2 folder needs {CONFIG_FILE} "
                                    f"and {WEIGHTS_FILE}")
    config = read_config(folder / CONFIG_FILE)
    model = dinov2_from_state_dict(load_file(str(folder / WEIGHTS_FILE)), config, image_size=image_size,
                                   antialias=antialias, compute_dtype=compute_dtype,
                                   source=str(folder / WEIGHTS_FILE))
    return model, config
