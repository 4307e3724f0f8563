"""REPA (Yu et al. 2024, "Representation Alignment for Generation Made Easier"), routing-aware.

REPA adds to the denoising loss ``coef`` times the mean, over tokens and images, of the negative
cosine similarity between the backbone's hidden tokens after block ``depth`` (1-based, REPA's
``encoder_depth``), passed through a small MLP projector, and a frozen encoder's patch features
of the clean image at the same positions (github.com/sihyun-yu/REPA: ``models/sit.py``
``build_mlp``, ``loss.py`` ``SILoss``). The projector is trained with the backbone and unused at
sampling.

With TREAD routing, a block inside a route sees only the kept tokens: ``aligned_positions``
gives their original positions (from the ``RoutePlan``), and ``alignment_loss`` compares each
kept token with the encoder feature at its position. Outside every route all tokens align.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tread_jax.models import flops
from tread_jax.models.dinov2 import (
    CONFIG_FILE,
    DINOV2_REPOS,
    DinoV2,
    DinoV2Config,
    load_dinov2,
    normalize_imagenet,
    read_config,
    resize_bicubic,
)
from tread_jax.models.layers import dense
from tread_jax.routing import Route, RoutePlan, gather_tokens

# REPA's defaults: projector width and loss weight (train.py --projector-dim, --proj-coeff).
PROJECTOR_WIDTH = 2048
COEF = 0.5
# Shapes of the published DINOv2 models (their config.json: hidden_size, num_hidden_layers,
# num_attention_heads): the projector and the cost estimates use them without reading the weights
# (sampling a REPA-trained model needs no encoder).
_SHAPES = {"vits14": (384, 12, 6), "vitb14": (768, 12, 12), "vitl14": (1024, 24, 16)}
# The published models with registers have 4 (facebook/dinov2-with-registers-*).
_REGISTERS = 4
# torch.nn.functional.normalize's floor on the norm.
_NORM_EPS = 1e-12


class Projector(nnx.Module):
    """REPA's ``build_mlp``: ``Linear(hidden, width), SiLU, Linear(width, width), SiLU,
    Linear(width, z_dim)`` (``num_layers`` Linear layers in all, SiLU between). Weights are
    Xavier-uniform and biases zero, as REPA's ``initialize_weights`` sets every Linear."""

    def __init__(self, hidden_size: int, z_dim: int, *, width: int = PROJECTOR_WIDTH,
                 num_layers: int = 3, rngs: nnx.Rngs):
        if num_layers < 1:
            raise ValueError(f"the projector needs at least one layer, got num_layers={num_layers}")
        sizes = [hidden_size] + [width] * (num_layers - 1) + [z_dim]
        self.layers = nnx.List([dense(a, b, rngs=rngs) for a, b in zip(sizes, sizes[1:])])

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``[..., hidden_size] -> [..., z_dim]``, in the tokens' dtype."""
        x = self.layers[0](tokens)
        for layer in self.layers[1:]:
            x = layer(jax.nn.silu(x))
        return x


def active_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
    """A run config's ``repa`` section when REPA is enabled, else None (also for configs that
    predate it)."""
    repa = config.get("repa")
    return repa if repa is not None and repa.enabled else None


def aligned_positions(plan: RoutePlan | None, depth: int) -> jax.Array | None:
    """Original positions ``[B, K]`` of the tokens the backbone holds after block ``depth``
    (1-based: the output of 0-based block ``depth - 1``): the kept tokens of the route whose
    blocks include it, or None (every token) when no route does."""
    if depth < 1:
        raise ValueError(f"REPA depth counts blocks from 1 (the output of the first block), got {depth}")
    block = depth - 1
    for route, kept in zip(plan.routes, plan.kept) if plan is not None else ():
        if route.start <= block <= route.end:
            return kept
    return None


def _normalize(x: jax.Array) -> jax.Array:
    """``F.normalize(x, dim=-1)``: ``x / max(|x|, 1e-12)``."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _NORM_EPS)


def alignment_loss(projected: jax.Array, encoder_features: jax.Array,
                   positions: jax.Array | None = None, *, coef: float = COEF) -> jax.Array:
    """``coef * mean over images and tokens of -cos(projected, encoder feature)``, in float32.

    ``projected``: ``[B, K, D]`` projector outputs for the tokens the backbone held;
    ``encoder_features``: ``[B, N, D]`` patch features of the clean images, in the backbone's
    token order; ``positions``: ``[B, K]`` original positions of the held tokens
    (``aligned_positions``), or None when the backbone held all ``N`` tokens in order.
    """
    if projected.ndim != 3 or encoder_features.ndim != 3:
        raise ValueError(f"projected and encoder features must be [B, tokens, D], got shapes "
                         f"{projected.shape} and {encoder_features.shape}")
    (b, k, d), (b_enc, n, d_enc) = projected.shape, encoder_features.shape
    if (b, d) != (b_enc, d_enc):
        raise ValueError(f"projected {projected.shape} and encoder features {encoder_features.shape} "
                         "differ in batch or width")
    if positions is None:
        if k != n:
            raise ValueError(f"{k} projected tokens but {n} encoder tokens: the grids differ "
                             "(or pass the positions of the held tokens)")
        target = encoder_features
    else:
        if positions.shape != (b, k):
            raise ValueError(f"positions must be [B={b}, K={k}], got shape {positions.shape}")
        target = gather_tokens(encoder_features, positions)
    cosine = jnp.sum(_normalize(projected.astype(jnp.float32)) * _normalize(target.astype(jnp.float32)),
                     axis=-1)
    return -coef * cosine.mean()


def encoder_features(encoder: DinoV2, images: jax.Array) -> jax.Array:
    """REPA's targets: DINOv2 patch features of clean NHWC images in [-1, 1], without gradient.

    As REPA's ``preprocess_raw_image``: ImageNet normalisation, then a bicubic resize (no
    antialiasing) to the encoder's input size (256 -> 224 for a 16x16 grid) when they differ.
    """
    x = normalize_imagenet(images)
    if x.shape[1] != encoder.image_size or x.shape[2] != encoder.image_size:
        x = resize_bicubic(x, encoder.image_size)
    return jax.lax.stop_gradient(encoder(x))


def encoder_config(encoder: str | os.PathLike) -> DinoV2Config:
    """The network shape of a DINOv2 short name (``dinov2.DINOV2_REPOS``) or a local DINOv2 folder."""
    name = str(encoder)
    if name in DINOV2_REPOS:
        width, layers, heads = _SHAPES[name.split("-")[1]]
        return DinoV2Config(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                            num_register_tokens=_REGISTERS if name.endswith("-reg") else 0)
    config = Path(name).expanduser() / CONFIG_FILE
    if not config.is_file():
        raise ValueError(f"REPA encoder {name!r} is neither one of {sorted(DINOV2_REPOS)} nor a folder with "
                         f"{CONFIG_FILE}")
    return read_config(config)


def encoder_width(encoder: str | os.PathLike) -> int:
    """Feature width of a DINOv2 short name or local folder (``encoder_config``)."""
    return encoder_config(encoder).hidden_size


def images_from_uint8(pixels: jax.Array) -> jax.Array:
    """Stored ``uint8`` RGB images -> float32 in [-1, 1], the range ``encoder_features`` takes."""
    return pixels.astype(jnp.float32) / 127.5 - 1.0


def load_encoder(config: ml_collections.ConfigDict) -> tuple[Callable[[Any, jax.Array], jax.Array], Any]:
    """``(encode, weights)`` for ``config.repa``: pure ``encode(weights, images)`` =
    ``encoder_features`` of DINOv2 ``config.encoder`` (a short name, from the cache or downloaded,
    or a folder) built for ``config.encoder_image_size`` inputs with the position table resized
    with antialiasing, as REPA's timm loading does (``dinov2`` module docstring)."""
    model, _ = load_dinov2(config.encoder, image_size=config.encoder_image_size, antialias=True,
                           compute_dtype=jnp.dtype(config.get("encoder_dtype", "bfloat16")))
    return pure_encoder(model)


def pure_encoder(model: DinoV2) -> tuple[Callable[[Any, jax.Array], jax.Array], Any]:
    """``(encode, weights)`` of a built DINOv2: ``encode(weights, images)`` = ``encoder_features``."""
    graphdef, weights = nnx.split(model)

    def encode(weights: Any, images: jax.Array) -> jax.Array:
        return encoder_features(nnx.merge(graphdef, weights), images)

    return encode, weights


@dataclasses.dataclass(frozen=True)
class RepaMacs:
    """MACs REPA adds to one training image: ``encoder`` (the resize to its input size and its
    forward, no backward: it runs without gradient), ``projector`` and ``loss`` (forward and
    backward: three forwards, as the step's count). The backbone's backward from the alignment
    term is not extra: it shares the denoising loss's backward pass."""

    encoder: int
    projector: int
    loss: int

    @property
    def total(self) -> int:
        return self.encoder + self.projector + self.loss


def repa_macs(repa_config: ml_collections.ConfigDict, hidden_size: int, depth: int, image_size: int,
              num_tokens: int, routes: Sequence[Route] = (), *,
              encoder: DinoV2Config | None = None) -> RepaMacs:
    """``RepaMacs`` per image for ``config.repa`` on a backbone of ``depth`` blocks of width
    ``hidden_size`` and ``num_tokens`` tokens, with clean images of ``image_size`` pixels.

    The projector sees the tokens block ``repa_config.depth`` holds (the kept ones inside a
    route); the loss is counted as its three reductions per token (the dot product and two
    squared norms) over the encoder's width. ``encoder``: the encoder's shape, when it is not
    ``repa_config.encoder``'s (benchmarks of a reduced one).
    """
    encoder = encoder or encoder_config(repa_config.encoder)
    size = repa_config.encoder_image_size
    # resize_bicubic's two contractions over three channels, when the sizes differ.
    resize = 3 * size * image_size * (image_size + size) if size != image_size else 0
    aligned = flops.block_tokens(depth, num_tokens, routes)[repa_config.depth - 1]
    layers = nnx.eval_shape(lambda: Projector(hidden_size, encoder.hidden_size, width=repa_config.projector_width,
                                              rngs=nnx.Rngs(0))).layers
    projector = aligned * sum(layer.in_features * layer.out_features for layer in layers)
    return RepaMacs(encoder=resize + flops.dinov2_forward_macs(encoder, size), projector=3 * projector,
                    loss=3 * 3 * aligned * encoder.hidden_size)
