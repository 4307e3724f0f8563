"""Layers shared by the diffusion backbones: embeddings, adaLN-Zero pieces, patching.

Parameters are float32; every layer computes in the dtype of its input activations, so a
model picks its compute dtype by casting activations once (and a block can be run in float32
by casting its input).
"""

from __future__ import annotations

import math

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

xavier_uniform = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()


def cast_to_input_dtype(args, /, *, dtype=None, inexact=True):
    """A flax ``promote_dtype`` that computes in the first argument's (the input's) dtype."""
    del dtype, inexact
    compute_dtype = args[0].dtype
    return tuple(None if a is None else jnp.asarray(a, compute_dtype) for a in args)


class Dense(nnx.Linear):
    """``nnx.Linear`` that multiplies a 2-D view of its input: ``[..., in] -> [rows, in]``.

    XLA's CPU backend computes the weight gradient of a dot over ``[B, N, D]`` tokens (a
    contraction over two axes) several times slower than the same 2-D matmul; flattening the
    leading axes first makes the backward pass a plain GEMM. Same parameters as ``nnx.Linear``.
    """

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        if inputs.ndim <= 2:
            return super().__call__(inputs, out_sharding=out_sharding)
        lead = inputs.shape[:-1]
        flat = super().__call__(inputs.reshape(-1, inputs.shape[-1]), out_sharding=out_sharding)
        return flat.reshape(*lead, flat.shape[-1])


def dense(
    in_features: int,
    out_features: int,
    *,
    rngs: nnx.Rngs,
    kernel_init: nnx.Initializer = xavier_uniform,
    bias_init: nnx.Initializer = zeros,
) -> nnx.Linear:
    """A float32-parameter Linear layer that computes in its input's dtype (see :class:`Dense`)."""
    return Dense(
        in_features,
        out_features,
        kernel_init=kernel_init,
        bias_init=bias_init,
        promote_dtype=cast_to_input_dtype,
        rngs=rngs,
    )


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters, statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array | None = None, eps: float = 1e-6) -> jax.Array:
    """RMSNorm (Zhang & Sennrich, 2019): ``x / sqrt(mean(x^2) + eps)``, times ``scale`` if given;
    statistics in float32, result in ``x``'s dtype."""
    x32 = x.astype(jnp.float32)
    out = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
    if scale is not None:
        out = out * scale.astype(jnp.float32)
    return out.astype(x.dtype)


def rope_angles_2d(rows: jax.Array | np.ndarray, cols: jax.Array | np.ndarray, head_dim: int,
                   theta: float = 10000.0) -> jax.Array | np.ndarray:
    """2-D axial rotary angles ``[..., head_dim // 2]`` for tokens at grid ``(rows, cols)``.

    The first half of the rotated pairs (the first half of the head dimensions) turns with the
    row, the second with the column, each at the frequencies ``theta ** (-j / (head_dim // 4))``,
    ``j < head_dim // 4`` (RoPE, Su et al. 2021, per axis as EVA-02's
    ``VisionRotaryEmbeddingFast``, which LightningDiT uses with ``pt_seq_len = ft_seq_len``, so
    positions are the integer grid coordinates). numpy positions give numpy angles (static under
    jit); jax positions, such as a route's kept tokens, give jax angles.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
    xp = np if isinstance(rows, np.ndarray) and isinstance(cols, np.ndarray) else jnp
    quarter = head_dim // 4
    freqs = theta ** (-np.arange(quarter, dtype=np.float64) / quarter)
    rows = xp.asarray(rows, xp.float32)[..., None]
    cols = xp.asarray(cols, xp.float32)[..., None]
    return xp.concatenate([rows * freqs.astype(np.float32), cols * freqs.astype(np.float32)], axis=-1)


def apply_rope(x: jax.Array, angles: jax.Array | np.ndarray) -> jax.Array:
    """Rotates ``x: [B, N, H, d]`` by ``angles: [N, d/2]`` or ``[B, N, d/2]``: the adjacent pairs
    ``(x[..., 2j], x[..., 2j + 1])`` turn by ``angles[..., j]`` (EVA-02's interleaved
    ``rotate_half``, so LightningDiT's q/k layout needs no permutation)."""
    angles = jnp.asarray(angles, jnp.float32)
    if angles.ndim == 2:
        angles = angles[None]
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation of ``[B, N, D]`` tokens by per-sample ``[B, D]`` shift and scale."""
    return x * (1 + scale[:, None]) + shift[:, None]


def timestep_embedding(
    t: jax.Array, dim: int, *, max_period: float = 10000.0, freq_shift: int = 0
) -> jax.Array:
    """Sinusoidal embedding ``[cos, sin]`` of scalar noise labels, float32 ``[B, dim]``.

    ``freq_shift=0`` is DiT's original; diffusers' DiT port divides by ``half - 1`` instead
    (``freq_shift=1``): use 1 to reproduce diffusers' outputs; the hub's DiT weights were trained
    with the original's 0.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """DiT's fixed 2-D sin-cos table ``[grid_h * grid_w, dim]`` in row-major token order."""

    def embed_1d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # DiT puts the embedding of the column index first, then that of the row index.
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    table = np.concatenate([embed_1d(dim // 2, cols), embed_1d(dim // 2, rows)], axis=1)
    return table.astype(np.float32)


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
    """``[B, H, W, C] -> [B, (H/p)(W/p), p*p*C]``, tokens row-major, patch pixels (p, p, C)."""
    return einops.rearrange(x, "b (h p) (w q) c -> b (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(tokens: jax.Array, patch_size: int, height: int, width: int) -> jax.Array:
    """Inverse of :func:`patchify`: ``[B, N, p*p*C] -> [B, H, W, C]``."""
    return einops.rearrange(
        tokens, "b (h w) (p q c) -> b (h p) (w q) c", h=height // patch_size, p=patch_size, q=patch_size
    )


class PatchEmbed(nnx.Module):
    """Non-overlapping patches to tokens (a stride-p convolution written as one matmul)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int, *, rngs: nnx.Rngs):
        self.patch_size = patch_size
        self.proj = dense(patch_size * patch_size * in_channels, hidden_size, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(patchify(x, self.patch_size))


class TimestepEmbedder(nnx.Module):
    """Noise label -> sinusoidal features -> MLP."""

    def __init__(self, hidden_size: int, *, freq_dim: int = 256, freq_shift: int = 0, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.freq_dim = freq_dim
        self.freq_shift = freq_shift
        self.fc1 = dense(freq_dim, hidden_size, kernel_init=init, rngs=rngs)
        self.fc2 = dense(hidden_size, hidden_size, kernel_init=init, rngs=rngs)

    def __call__(self, t: jax.Array) -> jax.Array:
        h = timestep_embedding(t, self.freq_dim, freq_shift=self.freq_shift)
        return self.fc2(jax.nn.silu(self.fc1(h)))


class LabelEmbedder(nnx.Module):
    """Class label -> vector; index ``num_classes`` is the null class used for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, *, rngs: nnx.Rngs):
        self.table = nnx.Embed(
            num_classes + 1, hidden_size, embedding_init=nnx.initializers.normal(0.02), rngs=rngs
        )

    def __call__(self, labels: jax.Array) -> jax.Array:
        return self.table(labels)


class FinalLayer(nnx.Module):
    """adaLN-modulated norm and a zero-initialised projection to patch pixels.

    ``norm``: "layer" (DiT's LayerNorm without affine parameters) or "rms" (LightningDiT's
    RMSNorm with a learned scale, initialised to ones).
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *, norm: str = "layer",
                 rngs: nnx.Rngs):
        if norm not in ("layer", "rms"):
            raise ValueError(f"unknown final norm {norm!r}; expected 'layer' or 'rms'")
        self.norm_scale = nnx.Param(jnp.ones((hidden_size,), jnp.float32)) if norm == "rms" else None
        self.ada = dense(hidden_size, 2 * hidden_size, kernel_init=zeros, rngs=rngs)
        self.proj = dense(hidden_size, patch_size * patch_size * out_channels, kernel_init=zeros, rngs=rngs)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.ada(jax.nn.silu(c)), 2, axis=-1)
        normed = layer_norm(x) if self.norm_scale is None else rms_norm(x, self.norm_scale[...])
        return self.proj(modulate(normed, shift, scale))
