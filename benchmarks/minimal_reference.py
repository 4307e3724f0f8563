"""A minimal plain-JAX DiT train step (no flax, no optax): the yardstick for the trainer's step.

Same model math as ``tread_jax.models.dit.DiT`` (patch embedding, sin-cos positions, timestep
+ label conditioning, adaLN-Zero blocks, final layer), the same TREAD route (per-sample argsort
draw, gather, blocks, scatter into the sequence at the route's start), the EDM loss with
stratified noise levels, label dropout, Adam and an EMA, with the trainer's random streams
(``tread_jax.train_step``), so that for the same parameters and step it computes the same loss.
Attention is written as 2-D matmuls plus head-batched matmuls, the form the issue's prototype
used. ``from_tread_params`` maps the trainer's parameters to this layout (the kernels are the
same arrays; only the nesting differs).

Float32 only: the route's float32 rejoin block is then the same as every other block.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Spec:
    """The model, route, objective and optimizer settings the reference step needs."""

    depth: int = 6
    width: int = 128
    heads: int = 4
    patch: int = 2
    image: tuple[int, int, int] = (8, 8, 1)
    num_classes: int = 10
    route: tuple[int, int, float] | None = (1, 3, 0.5)  # blocks start..end, routed fraction
    sigma_data: float = 0.75
    p_mean: float = -0.4
    p_std: float = 1.2
    label_dropout: float = 0.1
    learning_rate: float = 3e-3
    b1: float = 0.9
    b2: float = 0.99
    warmup_steps: int = 100
    ema_decay: float = 0.995
    seed: int = 0

    @property
    def grid(self) -> tuple[int, int]:
        return self.image[0] // self.patch, self.image[1] // self.patch


def from_tread_params(tread: Params) -> Params:
    """The trainer's parameter dict (``ModelBuilder.init_params`` layout) in this module's layout."""

    def lin(layer: Params) -> tuple[jax.Array, jax.Array]:
        return layer["kernel"], layer["bias"]

    blocks = [{name: lin(b[name]) for name in ("ada", "qkv", "attn_out", "fc1", "fc2")}
              for _, b in sorted(tread["blocks"].items())]
    return {
        "patch": lin(tread["patch_embed"]["proj"]),
        "t1": lin(tread["t_embedder"]["fc1"]),
        "t2": lin(tread["t_embedder"]["fc2"]),
        "labels": tread["y_embedder"]["table"]["embedding"],
        "blocks": blocks,
        "final_ada": lin(tread["final_layer"]["ada"]),
        "final_proj": lin(tread["final_layer"]["proj"]),
    }


def _dense(x: jax.Array, layer: tuple[jax.Array, jax.Array]) -> jax.Array:
    kernel, bias = layer
    return (x.reshape(-1, x.shape[-1]) @ kernel + bias).reshape(*x.shape[:-1], -1)


def _norm_mod(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + 1e-6)
    return x * (1 + scale[:, None]) + shift[:, None]


def _pos_table(width: int, grid: tuple[int, int]) -> np.ndarray:
    # DiT's table: the column index's embedding first, then the row's; each [sin, cos].
    omega = 1.0 / 10000 ** (np.arange(width // 4) / (width / 4))
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    parts = [f(np.outer(axis.reshape(-1), omega)) for axis in (cols, rows) for f in (np.sin, np.cos)]
    return np.concatenate(parts, axis=1).astype(np.float32)


def _block(p: Params, x: jax.Array, c: jax.Array, heads: int) -> jax.Array:
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(_dense(jax.nn.silu(c), p["ada"]), 6, axis=-1)
    b, n, d = x.shape
    qkv = _dense(_norm_mod(x, shift1, scale1), p["qkv"]).reshape(b, n, 3, heads, d // heads)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3).reshape(b * heads, n, d // heads) for i in range(3))
    weights = jax.nn.softmax(q @ k.transpose(0, 2, 1) * (d // heads) ** -0.5, axis=-1)
    attn = (weights @ v).reshape(b, heads, n, d // heads).transpose(0, 2, 1, 3).reshape(b, n, d)
    x = x + gate1[:, None] * _dense(attn, p["attn_out"])
    hidden = jax.nn.gelu(_dense(_norm_mod(x, shift2, scale2), p["fc1"]), approximate=True)
    return x + gate2[:, None] * _dense(hidden, p["fc2"])


def forward(spec: Spec, params: Params, x: jax.Array, noise_labels: jax.Array, labels: jax.Array,
            kept: jax.Array | None) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, H, W, C]``; ``kept`` ``[B, K]`` are the tokens the route keeps."""
    b, (gh, gw), p, (_, _, ch) = x.shape[0], spec.grid, spec.patch, spec.image
    patches = x.reshape(b, gh, p, gw, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, -1)
    tokens = _dense(patches, params["patch"]) + _pos_table(spec.width, spec.grid)
    half = 128  # the timestep embedder's 256 frequencies
    args = noise_labels[:, None] * jnp.exp(-math.log(10000.0) * jnp.arange(half) / half)
    t = _dense(jax.nn.silu(_dense(jnp.concatenate([jnp.cos(args), jnp.sin(args)], -1), params["t1"])), params["t2"])
    c = t + params["labels"][labels]
    start, end = (spec.route[0], spec.route[1]) if kept is not None else (-1, -1)
    rows = jnp.arange(b)[:, None]
    for i, block in enumerate(params["blocks"]):
        if i == start:
            saved, tokens = tokens, tokens[rows, kept]
        tokens = _block(block, tokens, c, spec.heads)
        if i == end:
            tokens = saved.at[rows, kept].set(tokens)
    shift, scale = jnp.split(_dense(jax.nn.silu(c), params["final_ada"]), 2, axis=-1)
    out = _dense(_norm_mod(tokens, shift, scale), params["final_proj"])
    return out.reshape(b, gh, gw, p, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(x.shape)


def loss(spec: Spec, params: Params, images: jax.Array, labels: jax.Array, step: jax.Array) -> jax.Array:
    """The EDM loss of one batch, with the trainer's random draws for ``step``."""
    b = images.shape[0]
    key = jax.random.fold_in(jax.random.key(spec.seed), step)
    label_key, loss_key, route_key = jax.random.split(key, 3)
    labels = jnp.where(jax.random.bernoulli(label_key, spec.label_dropout, labels.shape), spec.num_classes, labels)
    kept = None
    if spec.route is not None:
        n = spec.grid[0] * spec.grid[1]
        noise = jax.random.uniform(jax.random.fold_in(route_key, 0), (b, n))
        kept = jnp.argsort(noise, axis=-1)[:, : n - math.floor(n * spec.route[2])].astype(jnp.int32)
    sigma_key, noise_key = jax.random.split(loss_key)
    slot_key, offset_key = jax.random.split(sigma_key)
    u = (jax.random.permutation(slot_key, b) + jax.random.uniform(offset_key, (b,))) / b
    sigma = jnp.exp(jax.scipy.special.ndtri(jnp.clip(u, 1e-7, 1 - 1e-7)) * spec.p_std + spec.p_mean)
    s, sd2 = sigma[:, None, None, None], spec.sigma_data**2
    noisy = images + jax.random.normal(noise_key, images.shape) * s
    out = forward(spec, params, noisy / jnp.sqrt(s**2 + sd2), jnp.log(sigma) / 4, labels, kept)
    denoised = sd2 / (s**2 + sd2) * noisy + s * spec.sigma_data / jnp.sqrt(s**2 + sd2) * out
    return ((s**2 + sd2) / (s * spec.sigma_data) ** 2 * (denoised - images) ** 2).mean()


def init_state(params: Params) -> dict[str, Any]:
    """Step 0: the parameters, zero Adam moments and an EMA copy."""
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # separate buffers: the step donates them
    return {"step": jnp.zeros((), jnp.int32), "params": params, "mu": zeros(), "nu": zeros(),
            "ema": jax.tree.map(jnp.copy, params)}


def train_step(
    spec: Spec, state: dict[str, Any], images: jax.Array, labels: jax.Array
) -> tuple[dict[str, Any], jax.Array]:
    """One Adam step (linear warmup) and EMA update; returns the new state and the loss."""
    step = state["step"]
    value, grads = jax.value_and_grad(lambda p: loss(spec, p, images, labels, step))(state["params"])
    t = (step + 1).astype(jnp.float32)
    mu = jax.tree.map(lambda m, g: spec.b1 * m + (1 - spec.b1) * g, state["mu"], grads)
    nu = jax.tree.map(lambda v, g: spec.b2 * v + (1 - spec.b2) * g * g, state["nu"], grads)
    lr = spec.learning_rate * jnp.minimum(step / spec.warmup_steps, 1.0)
    scale = lr * jnp.sqrt(1 - spec.b2**t) / (1 - spec.b1**t)
    params = jax.tree.map(lambda p, m, v: p - scale * m / (jnp.sqrt(v) + 1e-8), state["params"], mu, nu)
    ema = jax.tree.map(lambda e, p: e + (1 - spec.ema_decay) * (p - e), state["ema"], params)
    return {"step": step + 1, "params": params, "mu": mu, "nu": nu, "ema": ema}, value
