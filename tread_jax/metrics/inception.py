"""FID Inception v3 in Flax NNX, with a torch-free loader for pytorch-fid's released weights.

The network is the 2015-12-05 TensorFlow Inception graph that FID, sFID, IS and the ADM
evaluator are defined with, in the layout pytorch-fid ported it to: torchvision's Inception3 with
its Mixed blocks replaced by the FID variants (average pools that ignore padding, a max pool in
the last block, a 1008-way classifier).

Inputs are NHWC images, either uint8 in [0, 255] or floating point in [-1, 1] (the pixel
convention of this package); the dtype decides which. Two preprocessing modes:

* ``"pytorch_fid"`` (default): bilinear resize to 299x299 with half-pixel centres and no
  antialiasing (``F.interpolate(..., mode="bilinear", align_corners=False)``), pixels in [-1, 1]
  as ``x / 127.5 - 1``. Matches pytorch-fid.
* ``"adm"``: what the TensorFlow graph inside ADM's ``evaluator.py`` does to its [0, 255] input:
  TF1 ``ResizeBilinear`` without half-pixel centres, then ``(x - 128) / 128``. Use this to compare
  with statistics that ADM's evaluator computed, e.g. ``VIRTUAL_imagenet256_labeled.npz``.

Outputs (a dict of float32 arrays):

* ``pool``: [B, 2048] final average pool, the FID features (TF ``pool_3``).
* ``logits``: [B, 1008] classifier output with bias, as pytorch-fid's ``fc``.
* ``logits_unbiased``: [B, 1008] the same without the bias. ADM's evaluator and torch-fidelity
  compute the Inception Score from the softmax of these over all 1008 outputs.
* ``spatial``: [B, 2023] sFID features: ADM's ``mixed_6/conv`` (= ``Mixed_6d.branch1x1`` after
  ReLU, [B, 17, 17, 192]), first 7 channels, flattened in NHWC order as TF does.

Weights: ``load_inception()`` reads pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
from ``$TREAD_JAX_CACHE`` (default ``~/.cache/tread_jax``), downloading it there on first use
and checking that its SHA-256 starts with ``6726825d``. Offline, copy the file to that
directory. The ``.pth`` is parsed without torch.

The model is pure inference (BatchNorm uses its stored statistics, eps 1e-3). For jitted,
sharded evaluation split it once: ``apply, state = inception_apply_fn(model)`` and
``jax.jit(apply)(state, images)`` with the state replicated and the images sharded on batch.
"""

from __future__ import annotations

import collections
import os
import pickle
import urllib.error
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tread_jax.cache import cache_root, download, sha256_file

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
# torch.hub convention: the suffix of the file name is the start of the file's SHA-256 digest.
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
INPUT_SIZE = 299
NUM_LOGITS = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]: 17 * 17 * 7 = 2023 dims.

Preprocessing = Literal["pytorch_fid", "adm"]
_Pair = int | tuple[int, int]


# ----------------------------------------------------------------------------------------------
# Network


class _ConvBN(nnx.Module):
    """Conv (no bias) -> BatchNorm (inference, eps 1e-3) -> ReLU: torchvision's BasicConv2d.

    Parameters start as zeros: the network is only ever used with loaded weights, and zeros
    cost nothing to create (random initialisation of 27M parameters takes minutes on a CPU).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: _Pair, *, stride: int = 1,
                 padding: _Pair = 0, precision: Any):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        self.stride = stride
        self.padding = ((ph, ph), (pw, pw))
        self.precision = precision
        self.kernel = nnx.Param(np.zeros((kh, kw, in_ch, out_ch), np.float32))  # HWIO
        self.scale = nnx.Param(np.zeros(out_ch, np.float32))
        self.bias = nnx.Param(np.zeros(out_ch, np.float32))
        self.mean = nnx.BatchStat(np.zeros(out_ch, np.float32))
        self.var = nnx.BatchStat(np.zeros(out_ch, np.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...], (self.stride, self.stride), self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
        y = (y - self.mean[...]) * (self.scale[...] * jax.lax.rsqrt(self.var[...] + 1e-3))
        return jax.nn.relu(y + self.bias[...])


class _Linear(nnx.Module):
    """The 1008-way classifier; zero-initialised like _ConvBN."""

    def __init__(self, in_features: int, out_features: int, *, precision: Any):
        self.precision = precision
        self.kernel = nnx.Param(np.zeros((in_features, out_features), np.float32))
        self.bias = nnx.Param(np.zeros(out_features, np.float32))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    # TensorFlow's average pool ignores the padded zeros (pytorch-fid: count_include_pad=False).
    return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                        count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _BlockA(nnx.Module):
    """FIDInceptionA (Mixed_5b/c/d)."""

    def __init__(self, in_ch: int, pool_features: int, *, precision: Any):
        c = dict(precision=precision)
        self.branch1x1 = _ConvBN(in_ch, 64, 1, **c)
        self.branch5x5_1 = _ConvBN(in_ch, 48, 1, **c)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2, **c)
        self.branch3x3dbl_1 = _ConvBN(in_ch, 64, 1, **c)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1, **c)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1, **c)
        self.branch_pool = _ConvBN(in_ch, pool_features, 1, **c)

    def __call__(self, x: jax.Array) -> jax.Array:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return jnp.concatenate([self.branch1x1(x), b5, b3, bp], axis=-1)


class _BlockB(nnx.Module):
    """InceptionB (Mixed_6a), unchanged from torchvision."""

    def __init__(self, in_ch: int, *, precision: Any):
        c = dict(precision=precision)
        self.branch3x3 = _ConvBN(in_ch, 384, 3, stride=2, **c)
        self.branch3x3dbl_1 = _ConvBN(in_ch, 64, 1, **c)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1, **c)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2, **c)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, _max_pool_3x3_s2(x)], axis=-1)


class _BlockC(nnx.Module):
    """FIDInceptionC (Mixed_6b..6e). Output channels 0..191 are branch1x1 (sFID's source)."""

    def __init__(self, in_ch: int, c7: int, *, precision: Any):
        c = dict(precision=precision)
        self.branch1x1 = _ConvBN(in_ch, 192, 1, **c)
        self.branch7x7_1 = _ConvBN(in_ch, c7, 1, **c)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding=(0, 3), **c)
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), padding=(3, 0), **c)
        self.branch7x7dbl_1 = _ConvBN(in_ch, c7, 1, **c)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding=(3, 0), **c)
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding=(0, 3), **c)
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding=(3, 0), **c)
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), padding=(0, 3), **c)
        self.branch_pool = _ConvBN(in_ch, 192, 1, **c)

    def __call__(self, x: jax.Array) -> jax.Array:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool_3x3(x))
        return jnp.concatenate([self.branch1x1(x), b7, bd, bp], axis=-1)


class _BlockD(nnx.Module):
    """InceptionD (Mixed_7a), unchanged from torchvision."""

    def __init__(self, in_ch: int, *, precision: Any):
        c = dict(precision=precision)
        self.branch3x3_1 = _ConvBN(in_ch, 192, 1, **c)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2, **c)
        self.branch7x7x3_1 = _ConvBN(in_ch, 192, 1, **c)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3), **c)
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0), **c)
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2, **c)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class _BlockE(nnx.Module):
    """FIDInceptionE_1 (Mixed_7b, average pool) and FIDInceptionE_2 (Mixed_7c, max pool)."""

    def __init__(self, in_ch: int, pool: Literal["avg", "max"], *, precision: Any):
        c = dict(precision=precision)
        self.pool = pool
        self.branch1x1 = _ConvBN(in_ch, 320, 1, **c)
        self.branch3x3_1 = _ConvBN(in_ch, 384, 1, **c)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1), **c)
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0), **c)
        self.branch3x3dbl_1 = _ConvBN(in_ch, 448, 1, **c)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1, **c)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1), **c)
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0), **c)
        self.branch_pool = _ConvBN(in_ch, 192, 1, **c)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        else:
            # The FID graph max-pools here (pytorch-fid's FIDInceptionE_2); padding is -inf.
            pooled = nnx.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        return jnp.concatenate([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], axis=-1)


def resize_bilinear_half_pixel(images: jax.Array, size: int) -> jax.Array:
    """Bilinear resize of NHWC images as ``F.interpolate(bilinear, align_corners=False)``.

    Without antialiasing, jax's triangle kernel samples at half-pixel centres and renormalises
    at the borders, which equals torch's clamping, for up- and downsampling alike.
    """
    b, _, _, c = images.shape
    return jax.image.resize(images, (b, size, size, c), method="bilinear", antialias=False)


def resize_bilinear_tf_legacy(images: jax.Array, size: int) -> jax.Array:
    """Bilinear resize of NHWC images as TF1 ``ResizeBilinear`` (align_corners=False, no
    half-pixel centres): output pixel i samples input coordinate ``i * in / out``."""

    def along(x: jax.Array, axis: int) -> jax.Array:
        n = x.shape[axis]
        src = jnp.arange(size, dtype=jnp.float32) * (n / size)
        lo = jnp.floor(src).astype(jnp.int32)
        hi = jnp.minimum(lo + 1, n - 1)
        frac_shape = [1] * x.ndim
        frac_shape[axis] = size
        frac = (src - lo).reshape(frac_shape)
        return jnp.take(x, lo, axis=axis) * (1 - frac) + jnp.take(x, hi, axis=axis) * frac

    return along(along(images, 1), 2)


def preprocess(images: jax.Array, mode: Preprocessing = "pytorch_fid") -> jax.Array:
    """uint8 [0, 255] or float [-1, 1] NHWC RGB images -> float32 [B, 299, 299, 3] network input."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"Inception expects NHWC RGB images [B, H, W, 3], got {images.shape}")
    if mode == "pytorch_fid":
        if images.dtype == jnp.uint8:
            x = images.astype(jnp.float32) / 127.5 - 1.0
        else:
            x = images.astype(jnp.float32)
        if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
            x = resize_bilinear_half_pixel(x, INPUT_SIZE)
        return x
    if mode == "adm":
        if images.dtype == jnp.uint8:
            x = images.astype(jnp.float32)
        else:
            x = (images.astype(jnp.float32) + 1.0) * 127.5
        if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
            x = resize_bilinear_tf_legacy(x, INPUT_SIZE)
        return (x - 128.0) / 128.0
    raise ValueError(f"unknown Inception preprocessing {mode!r}; use 'pytorch_fid' or 'adm'")


class InceptionV3(nnx.Module):
    """The FID Inception v3 (see the module docstring for inputs and outputs).

    Created with zero parameters; ``load_inception`` or ``inception_from_state_dict`` fill them.
    Module names follow pytorch-fid's state dict so that weights map one to one.
    ``precision`` applies to every convolution and the classifier; HIGHEST by default because
    accelerators otherwise run float32 convolutions in reduced precision, which moves FID.
    """

    def __init__(self, *, preprocessing: Preprocessing = "pytorch_fid",
                 precision: Any = jax.lax.Precision.HIGHEST):
        if preprocessing not in ("pytorch_fid", "adm"):
            raise ValueError(f"unknown Inception preprocessing {preprocessing!r}")
        self.preprocessing = preprocessing
        c = dict(precision=precision)
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2, **c)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3, **c)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1, **c)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1, **c)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3, **c)
        self.Mixed_5b = _BlockA(192, 32, **c)
        self.Mixed_5c = _BlockA(256, 64, **c)
        self.Mixed_5d = _BlockA(288, 64, **c)
        self.Mixed_6a = _BlockB(288, **c)
        self.Mixed_6b = _BlockC(768, 128, **c)
        self.Mixed_6c = _BlockC(768, 160, **c)
        self.Mixed_6d = _BlockC(768, 160, **c)
        self.Mixed_6e = _BlockC(768, 192, **c)
        self.Mixed_7a = _BlockD(768, **c)
        self.Mixed_7b = _BlockE(1280, "avg", **c)
        self.Mixed_7c = _BlockE(2048, "max", **c)
        self.fc = _Linear(POOL_DIM, NUM_LOGITS, precision=precision)

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        x = preprocess(images, self.preprocessing)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _max_pool_3x3_s2(x)
        x = _max_pool_3x3_s2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))
        x = self.Mixed_6d(x)
        spatial = x[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        x = self.Mixed_7a(self.Mixed_6e(x))
        x = self.Mixed_7c(self.Mixed_7b(x))
        pool = jnp.mean(x, axis=(1, 2))
        logits_unbiased = jnp.dot(pool, self.fc.kernel[...], precision=self.fc.precision)
        return {
            "pool": pool,
            "logits": logits_unbiased + self.fc.bias[...],
            "logits_unbiased": logits_unbiased,
            "spatial": spatial,
        }


def inception_apply_fn(model: InceptionV3) -> tuple[
        Callable[[nnx.State, jax.Array], dict[str, jax.Array]], nnx.State]:
    """Split ``model`` into a pure ``apply(state, images) -> outputs`` and its state.

    ``apply`` can be wrapped in ``jax.jit`` with explicit shardings (state replicated, images
    and outputs sharded over the batch axis).
    """
    graphdef, state = nnx.split(model)

    def apply(state: nnx.State, images: jax.Array) -> dict[str, jax.Array]:
        return nnx.merge(graphdef, state)(images)

    return apply, state


# ----------------------------------------------------------------------------------------------
# Reading PyTorch checkpoints without torch


# torch storage class name -> numpy dtype of its elements.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": None, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
    def __init__(self, name: str):
        if _STORAGE_DTYPES.get(name) is None:
            raise ValueError(f"unsupported tensor storage type torch.{name} in checkpoint")
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """A storage referenced by the pickle; its bytes are attached after unpickling."""

    def __init__(self, dtype: np.dtype, numel: int):
        self.dtype = dtype
        self.numel = numel
        self.data: np.ndarray | None = None


class _LazyTensor:
    """Result of torch._utils._rebuild_tensor_v2; materialised once storages are read."""

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...],
                 stride: tuple[int, ...], *_unused: Any):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def to_numpy(self) -> np.ndarray:
        flat = self.storage.data
        # as_strided does not bounds-check: refuse a tensor reaching past its storage.
        if any(n == 0 for n in self.size):
            return np.zeros(self.size, flat.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if self.offset < 0 or min(self.stride, default=0) < 0 or last >= len(flat):
            raise ValueError("checkpoint tensor lies outside its storage; the file is corrupt")
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.size, strides=[s * itemsize for s in self.stride])
        return np.array(view)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a state dict, allowing only the few globals a tensor state dict refers to."""

    def __init__(self, file: IO[bytes], storages: dict[str, _Storage]):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _LazyTensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"checkpoint refers to {module}.{name}, which a plain "
                                     "tensor state dict never does; refusing to load it")

    def persistent_load(self, pid: Any) -> _Storage:
        # ('storage', storage_type, key, location, numel[, view_metadata])
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views (legacy torch format) are not supported")
        key = str(key)
        if key not in self._storages:
            self._storages[key] = _Storage(storage_type.dtype, int(numel))
        return self._storages[key]


def _materialise(obj: Any) -> dict[str, np.ndarray]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    out = {}
    for name, value in obj.items():
        if not isinstance(value, _LazyTensor):
            raise ValueError(f"state dict entry {name!r} is not a tensor")
        out[name] = value.to_numpy()
    return out


def _read_zip_checkpoint(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise ValueError(f"{path}: not a torch checkpoint (no single data.pkl in the zip)")
        prefix = pkl[0][: -len("data.pkl")]
        big_endian = (prefix + "byteorder" in names
                      and zf.read(prefix + "byteorder").strip() == b"big")
        storages: dict[str, _Storage] = {}
        with zf.open(pkl[0]) as f:
            obj = _RestrictedUnpickler(f, storages).load()
        for key, storage in storages.items():
            dtype = storage.dtype.newbyteorder(">" if big_endian else "<")
            data = np.frombuffer(zf.read(f"{prefix}data/{key}"), dtype=dtype)
            storage.data = data.astype(storage.dtype.newbyteorder("="))
    return _materialise(obj)


def _read_legacy_checkpoint(path: Path) -> dict[str, np.ndarray]:
    """torch.save before 1.6 (the pytorch-fid release): pickles, then each storage as an
    int64 element count followed by its raw little-endian bytes."""
    with open(path, "rb") as f:
        try:
            magic = pickle.load(f)
        except Exception as err:
            raise ValueError(f"{path}: not a torch checkpoint ({err})") from None
        if magic != _LEGACY_MAGIC:
            raise ValueError(f"{path}: not a torch checkpoint (bad magic number)")
        pickle.load(f)  # protocol version
        sys_info = pickle.load(f)
        if not sys_info.get("little_endian", True):
            raise ValueError(f"{path}: big-endian legacy checkpoints are not supported")
        storages: dict[str, _Storage] = {}
        obj = _RestrictedUnpickler(f, storages).load()
        keys = pickle.load(f)
        for key in keys:
            storage = storages[str(key)]
            numel = int(np.frombuffer(f.read(8), dtype="<i8")[0])
            if numel != storage.numel:
                raise ValueError(f"{path}: storage {key} is truncated or corrupt")
            raw = f.read(numel * storage.dtype.itemsize)
            if len(raw) != numel * storage.dtype.itemsize:
                raise ValueError(f"{path}: file ends inside storage {key}")
            storage.data = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<")).astype(
                storage.dtype)
    return _materialise(obj)


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``torch.save``d state dict (zip or pre-1.6 legacy format) as numpy arrays.

    Uses a restricted unpickler: only OrderedDict, tensor rebuilding and storage types are
    accepted, so no code from the file runs and torch is not needed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if zipfile.is_zipfile(path):
        return _read_zip_checkpoint(path)
    return _read_legacy_checkpoint(path)


# ----------------------------------------------------------------------------------------------
# Mapping the state dict onto the Flax model


def _torch_name(path: tuple[Any, ...]) -> str:
    """Flax variable path -> pytorch-fid state dict key."""
    *modules, leaf = (str(p) for p in path)
    if modules == ["fc"]:
        return {"kernel": "fc.weight", "bias": "fc.bias"}[leaf]
    leaf = {"kernel": "conv.weight", "scale": "bn.weight", "bias": "bn.bias",
            "mean": "bn.running_mean", "var": "bn.running_var"}[leaf]
    return ".".join([*modules, leaf])


def _to_flax_layout(name: str, value: np.ndarray) -> np.ndarray:
    if name.endswith("conv.weight"):
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if name == "fc.weight":
        return value.T  # [out, in] -> [in, out]
    return value


def inception_from_state_dict(state_dict: Mapping[str, np.ndarray], *,
                              preprocessing: Preprocessing = "pytorch_fid",
                              precision: Any = jax.lax.Precision.HIGHEST) -> InceptionV3:
    """Build an InceptionV3 holding the weights of a pytorch-fid style state dict."""
    model = InceptionV3(preprocessing=preprocessing, precision=precision)
    expected = set()
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Variable):
            continue
        name = _torch_name(path)
        expected.add(name)
        if name not in state_dict:
            raise ValueError(f"Inception state dict lacks {name!r}")
        value = _to_flax_layout(name, np.asarray(state_dict[name]))
        if value.shape != var.shape:
            raise ValueError(f"Inception weight {name!r} has shape {value.shape}, "
                             f"expected {var.shape} (after layout conversion)")
        var.set_value(jnp.asarray(value, dtype=jnp.float32))
    unexpected = sorted(k for k in state_dict
                        if k not in expected and not k.endswith("num_batches_tracked"))
    if unexpected:
        raise ValueError(f"Inception state dict has unexpected entries: {unexpected[:5]}")
    return model


# ----------------------------------------------------------------------------------------------
# Weight file: cache, download, checksum


def fetch_inception_weights(*, url: str = FID_WEIGHTS_URL,
                            sha256_prefix: str = FID_WEIGHTS_SHA256_PREFIX,
                            directory: str | os.PathLike | None = None) -> Path:
    """Path of the FID Inception weights in the cache, downloading them if absent.

    The file's SHA-256 must start with ``sha256_prefix`` (the hash fragment in the released
    file name). Raises FileNotFoundError when the file is absent and cannot be downloaded,
    naming where to put it; ValueError when the checksum does not match.
    """
    directory = Path(directory) if directory is not None else cache_root()
    dest = directory / url.rsplit("/", 1)[-1]
    if not dest.is_file():
        try:
            download(url, dest)
        except (urllib.error.URLError, OSError) as err:
            raise FileNotFoundError(
                f"FID Inception weights not found at {dest} and the download from {url} "
                f"failed ({err}); fetch that file elsewhere and copy it to {dest} "
                "(set TREAD_JAX_CACHE to use another directory)") from None
    digest = sha256_file(dest)
    if not digest.startswith(sha256_prefix):
        bad = dest.with_name(dest.name + ".corrupt")
        dest.replace(bad)
        raise ValueError(f"{dest}: SHA-256 {digest[:16]}... does not start with "
                         f"{sha256_prefix}; moved it to {bad}, fetch it again")
    return dest


def load_inception(path: str | os.PathLike | None = None, *,
                   preprocessing: Preprocessing = "pytorch_fid",
                   precision: Any = jax.lax.Precision.HIGHEST) -> InceptionV3:
    """The FID Inception with pytorch-fid's weights.

    ``path``: a ``.pth`` state dict to read as is; by default the checksummed released file
    from the cache (downloaded on first use).
    """
    path = Path(path) if path is not None else fetch_inception_weights()
    return inception_from_state_dict(load_torch_state_dict(path),
                                     preprocessing=preprocessing, precision=precision)

