"""The Stable Diffusion VAE (diffusers' AutoencoderKL) in Flax NNX, loaded from diffusers files.

TREAD trains on ImageNet latents of sd-vae-ft-ema (256x256x3 -> 32x32x4, scaled by 0.18215) and
decodes samples with the same VAE. This module rebuilds the architecture in NHWC, reads a
diffusers-format directory (`config.json` + `diffusion_pytorch_model.safetensors`) with the numpy
safetensors API (no torch at run time), and fetches sd-vae-ft-ema from the Hugging Face hub into a
checksummed cache when online.

Usage under jit, sharded over the batch by the caller:

    vae, config = load_vae("/path/to/sd-vae-ft-ema")      # or load_vae("stabilityai/sd-vae-ft-ema")
    graphdef, params = nnx.split(vae)
    encode = jax.jit(functools.partial(encode_moments, graphdef))
    mean, logvar = encode(params, images)                  # images: f32[B, H, W, 3] in [-1, 1]
    z = config.scaling_factor * (mean + jnp.exp(0.5 * logvar) * noise)
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from tread_jax.cache import cache_root, fetch_files

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"

SD_VAE_REPO = "stabilityai/sd-vae-ft-ema"
SD_VAE_URL = "https://huggingface.co/stabilityai/sd-vae-ft-ema/resolve/main/{file}"
# Published digests to check downloads against. None: no digest could be confirmed from an
# authoritative source when this was written, so the first download's digest is recorded beside
# the file and every later use is checked against that record (trust on first use).
SD_VAE_SHA256: dict[str, str | None] = {CONFIG_FILE: None, WEIGHTS_FILE: None}

# diffusers clamps the log-variance to this range before building the Gaussian.
LOGVAR_RANGE = (-30.0, 20.0)
# Every norm in the SD VAE (resnets, attention, output norms) uses this epsilon.
NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of a diffusers AutoencoderKL `config.json` that shape the network."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def read_config(path: str | os.PathLike) -> VAEConfig:
    """Reads a diffusers AutoencoderKL `config.json`; ValueError for architectures not built here."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VAE config not found: {path}")
    raw = json.loads(path.read_text())
    n = len(raw.get("block_out_channels", VAEConfig.block_out_channels))
    # Only the plain SD layout is implemented; other block types would load wrong silently.
    expected = {
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "act_fn": "silu",
    }
    for key, value in expected.items():
        got = raw.get(key, value)
        got = list(got) if isinstance(value, list) else got
        if got != value:
            raise ValueError(f"{path}: unsupported {key}={got!r}; only {value!r} is implemented")
    fields = {f.name for f in dataclasses.fields(VAEConfig)}
    kwargs = {k: v for k, v in raw.items() if k in fields and v is not None}
    if "block_out_channels" in kwargs:
        kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
    return VAEConfig(**kwargs)


class ResnetBlock(nnx.Module):
    """diffusers ResnetBlock2D without time embedding: two GroupNorm-SiLU-conv3x3 stages."""

    def __init__(self, cin: int, cout: int, groups: int, dtype: Any, rngs: nnx.Rngs):
        self.norm1 = _group_norm(cin, groups, dtype, rngs)
        self.conv1 = _conv(cin, cout, 3, dtype, rngs)
        self.norm2 = _group_norm(cout, groups, dtype, rngs)
        self.conv2 = _conv(cout, cout, 3, dtype, rngs)
        self.conv_shortcut = _conv(cin, cout, 1, dtype, rngs) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nnx.Module):
    """The mid-block self-attention: one head over all pixels, residual, GroupNorm input."""

    def __init__(self, channels: int, groups: int, dtype: Any, rngs: nnx.Rngs):
        self.group_norm = _group_norm(channels, groups, dtype, rngs)
        self.to_q = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_k = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_v = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_out = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        # Pixels are addressed as (h, w) pairs rather than reshaped into one token axis: a reshape
        # of a batch-sharded array needs an explicit output sharding under Explicit mesh axes.
        t = self.group_norm(x)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        logits = jnp.einsum("bhwc,bxyc->bhwxy", q, k) / jnp.sqrt(jnp.asarray(x.shape[-1], q.dtype))
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=(-2, -1)).astype(v.dtype)
        return x + self.to_out(jnp.einsum("bhwxy,bxyc->bhwc", weights, v))


class Downsample(nnx.Module):
    """Stride-2 conv3x3 after padding one row/column at the bottom/right only, as diffusers does."""

    def __init__(self, channels: int, dtype: Any, rngs: nnx.Rngs):
        self.conv = nnx.Conv(channels, channels, (3, 3), strides=2, padding=((0, 1), (0, 1)),
                             dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour 2x upsampling followed by conv3x3."""

    def __init__(self, channels: int, dtype: Any, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownEncoderBlock(nnx.Module):
    """DownEncoderBlock2D: resnets, then a stride-2 downsampler except in the last block."""

    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, add_downsample: bool,
                 dtype: Any, rngs: nnx.Rngs):
        self.resnets = _resnets(cin, cout, num_layers, groups, dtype, rngs)
        # A list of at most one, named as in diffusers, so parameter paths match checkpoint keys.
        self.downsamplers = nnx.List([Downsample(cout, dtype, rngs)] if add_downsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
        return x


class UpDecoderBlock(nnx.Module):
    """UpDecoderBlock2D: resnets, then a 2x upsampler except in the last block."""

    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, add_upsample: bool,
                 dtype: Any, rngs: nnx.Rngs):
        self.resnets = _resnets(cin, cout, num_layers, groups, dtype, rngs)
        self.upsamplers = nnx.List([Upsample(cout, dtype, rngs)] if add_upsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x


def _resnets(cin: int, cout: int, num_layers: int, groups: int, dtype: Any,
             rngs: nnx.Rngs) -> nnx.List:
    return nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, dtype, rngs)
                     for i in range(num_layers)])


class MidBlock(nnx.Module):
    """UNetMidBlock2D: resnet, (attention, resnet)."""

    def __init__(self, channels: int, groups: int, add_attention: bool, dtype: Any, rngs: nnx.Rngs):
        self.resnets = _resnets(channels, channels, 2, groups, dtype, rngs)
        self.attentions = nnx.List([Attention(channels, groups, dtype, rngs)] if add_attention else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, dtype: Any, rngs: nnx.Rngs):
        chans, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = _conv(cfg.in_channels, chans[0], 3, dtype, rngs)
        self.down_blocks = nnx.List([
            DownEncoderBlock(chans[max(i - 1, 0)], c, cfg.layers_per_block, groups,
                             i < len(chans) - 1, dtype, rngs)
            for i, c in enumerate(chans)
        ])
        self.mid_block = MidBlock(chans[-1], groups, cfg.mid_block_add_attention, dtype, rngs)
        self.conv_norm_out = _group_norm(chans[-1], groups, dtype, rngs)
        self.conv_out = _conv(chans[-1], 2 * cfg.latent_channels, 3, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, dtype: Any, rngs: nnx.Rngs):
        chans, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = _conv(cfg.latent_channels, chans[0], 3, dtype, rngs)
        self.mid_block = MidBlock(chans[0], groups, cfg.mid_block_add_attention, dtype, rngs)
        self.up_blocks = nnx.List([
            UpDecoderBlock(chans[max(i - 1, 0)], c, cfg.layers_per_block + 1, groups,
                           i < len(chans) - 1, dtype, rngs)
            for i, c in enumerate(chans)
        ])
        self.conv_norm_out = _group_norm(chans[-1], groups, dtype, rngs)
        self.conv_out = _conv(chans[-1], cfg.out_channels, 3, dtype, rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """SD VAE on NHWC arrays. Parameters are float32; activations run in `compute_dtype`."""

    def __init__(self, config: VAEConfig, *, compute_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.encoder = Encoder(config, compute_dtype, rngs)
        self.decoder = Decoder(config, compute_dtype, rngs)
        latent2 = 2 * config.latent_channels
        self.quant_conv = (_conv(latent2, latent2, 1, compute_dtype, rngs)
                           if config.use_quant_conv else None)
        self.post_quant_conv = (_conv(config.latent_channels, config.latent_channels, 1, compute_dtype, rngs)
                                if config.use_post_quant_conv else None)

    def encode_moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """f32[B, H, W, C_in] in [-1, 1] -> (mean, logvar), each f32[B, H/f, W/f, latent_channels]."""
        _check_nhwc("images", images, self.config.in_channels)
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents (divide by `scaling_factor` first) -> f32[B, H, W, C_out], about [-1, 1]."""
        _check_nhwc("latents", latents, self.config.latent_channels)
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents).astype(jnp.float32)


def encode_moments(graphdef: nnx.GraphDef, params: nnx.State,
                   images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pure form of `AutoencoderKL.encode_moments` over `nnx.split(vae)`, for jax.jit/shardings."""
    return nnx.merge(graphdef, params).encode_moments(images)


def decode(graphdef: nnx.GraphDef, params: nnx.State, latents: jax.Array) -> jax.Array:
    """Pure form of `AutoencoderKL.decode` over `nnx.split(vae)`, for jax.jit/shardings."""
    return nnx.merge(graphdef, params).decode(latents)


def _check_nhwc(name: str, x: jax.Array, channels: int) -> None:
    # Shapes are static under jit, so this runs once at trace time; it catches NCHW inputs.
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(f"{name} must be NHWC with {channels} channels, got shape {tuple(x.shape)}")


def _conv(cin: int, cout: int, k: int, dtype: Any, rngs: nnx.Rngs) -> nnx.Conv:
    # Explicit symmetric padding: torch's padding=k//2, identical to SAME for odd k and stride 1.
    return nnx.Conv(cin, cout, (k, k), padding=((k // 2, k // 2),) * 2, dtype=dtype, rngs=rngs)


def _group_norm(channels: int, groups: int, dtype: Any, rngs: nnx.Rngs) -> nnx.GroupNorm:
    # Two-pass variance, as torch computes it; the fast E[x^2]-E[x]^2 form loses digits.
    return nnx.GroupNorm(channels, groups, epsilon=NORM_EPS, dtype=dtype,
                         use_fast_variance=False, rngs=rngs)


# ------------------------------------------------------------------------------------------------
# Loading diffusers checkpoints.

# Older diffusers checkpoints name the attention projections after the original LDM code, some
# as 1x1 convolutions; they carry the same numbers as today's to_q/to_k/to_v/to_out.0.
_LEGACY_ATTENTION = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _checkpoint_key(path: tuple) -> str:
    """NNX parameter path -> diffusers state-dict key."""
    parts = [str(p) for p in path]
    parts[-1] = {"kernel": "weight", "scale": "weight"}.get(parts[-1], parts[-1])
    return ".".join(parts).replace(".to_out.", ".to_out.0.")


def _modern_key(key: str) -> str:
    return _LEGACY_ATTENTION.sub(lambda m: f"{m.group(1)}{_LEGACY_NAMES[m.group(2)]}.", key)


def _to_flax(tensor: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """Torch layout -> Flax layout: OIHW conv kernels to HWIO, [out, in] linear weights to [in, out]."""
    if tensor.ndim == 4 and len(target_shape) == 2:  # legacy 1x1-conv attention projection
        tensor = tensor[:, :, 0, 0]
    if tensor.ndim == 4:
        tensor = tensor.transpose(2, 3, 1, 0)
    elif tensor.ndim == 2:
        tensor = tensor.T
    return tensor


def _summarise(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown


def load_weights(vae: AutoencoderKL, weights_path: str | os.PathLike) -> None:
    """Copies a diffusers safetensors state dict into `vae` (in place); ValueError on any mismatch."""
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise FileNotFoundError(f"VAE weights not found: {weights_path}")
    tensors = {_modern_key(k): v for k, v in load_file(str(weights_path)).items()}
    state = nnx.state(vae, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    wanted = {_checkpoint_key(path): path for path in flat}
    missing = sorted(set(wanted) - set(tensors))
    unexpected = sorted(set(tensors) - set(wanted))
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} does not match the VAE built from its config: "
            f"missing keys [{_summarise(missing)}]; unexpected keys [{_summarise(unexpected)}]"
        )
    loaded, mismatched = {}, []
    for key, path in wanted.items():
        shape = tuple(flat[path].shape)
        array = _to_flax(tensors[key], shape)
        if array.shape != shape:
            mismatched.append(f"{key}: file {tensors[key].shape}, model {shape}")
        loaded[path] = jnp.asarray(array, dtype=jnp.float32)
    if mismatched:
        raise ValueError(f"{weights_path}: shape mismatch for {_summarise(mismatched)}")
    nnx.update(vae, nnx.from_flat_state(loaded))


def load_vae(path_or_name: str | os.PathLike = SD_VAE_REPO, *,
             compute_dtype: Any = jnp.float32) -> tuple[AutoencoderKL, VAEConfig]:
    """Builds the VAE from a diffusers-format directory, or from the hub name of sd-vae-ft-ema.

    A directory must hold `config.json` and `diffusion_pytorch_model.safetensors`. The name
    "stabilityai/sd-vae-ft-ema" resolves through `ensure_sd_vae` (cache, then download).
    """
    path = Path(path_or_name).expanduser()
    if not path.is_dir():
        if str(path_or_name) in (SD_VAE_REPO, SD_VAE_REPO.split("/")[1]):
            path = ensure_sd_vae()
        else:
            raise FileNotFoundError(
                f"VAE directory not found: {path_or_name} (expected a folder with {CONFIG_FILE} and "
                f"{WEIGHTS_FILE}, or the name {SD_VAE_REPO!r})"
            )
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} lacks {name}: a diffusers VAE folder needs {CONFIG_FILE} "
                                    f"and {WEIGHTS_FILE}")
    config = read_config(path / CONFIG_FILE)
    graphdef, abstract = _skeleton(config, compute_dtype)
    vae = nnx.merge(graphdef, abstract)
    load_weights(vae, path / WEIGHTS_FILE)
    return vae, config


@functools.lru_cache(maxsize=4)
def _skeleton(config: VAEConfig, compute_dtype: Any) -> tuple[nnx.GraphDef, nnx.State]:
    """The module structure with abstract parameters: the weights come from the file anyway.

    Cached because tracing the constructor costs seconds (flax probes every traced parameter).
    """
    abstract = nnx.eval_shape(lambda: AutoencoderKL(config, compute_dtype=compute_dtype,
                                                    rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


# ------------------------------------------------------------------------------------------------
# Fetching sd-vae-ft-ema.

def _offline_message(folder: Path, reason: str) -> str:
    return (f"sd-vae-ft-ema is not available offline ({reason}). Download {CONFIG_FILE} and "
            f"{WEIGHTS_FILE} from https://huggingface.co/{SD_VAE_REPO} and place them in {folder}, "
            f"or pass a local diffusers VAE folder instead.")


def ensure_sd_vae(cache_dir: str | os.PathLike | None = None, *, url: str = SD_VAE_URL,
                  sha256: dict[str, str | None] | None = None) -> Path:
    """Returns a folder holding sd-vae-ft-ema's diffusers files, downloading what is missing.

    Files land in `<cache>/sd-vae-ft-ema/`. Each file is checked against `sha256` (defaults to
    `SD_VAE_SHA256`) where a digest is given; otherwise against the digest recorded in
    `<file>.sha256` at first download. A corrupt or mismatching file raises ValueError and is
    never used. Set HF_HUB_OFFLINE=1 to fail fast without trying the network.
    `url` is a template with `{file}`; tests point it at file:// URLs.
    """
    folder = (Path(cache_dir).expanduser() if cache_dir is not None else cache_root()) / "sd-vae-ft-ema"
    return fetch_files(folder, (CONFIG_FILE, WEIGHTS_FILE), url, SD_VAE_SHA256 if sha256 is None else sha256,
                       lambda reason: _offline_message(folder, reason))
