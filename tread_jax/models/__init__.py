"""Model registry: build a backbone from a name such as ``"DiT-XL/2"``."""

from __future__ import annotations

import re

import jax.numpy as jnp
from flax import nnx

from tread_jax.models.dit import DiT
from tread_jax.models.ssm import SSM

# depth, hidden size, heads (DiT paper, Table 1).
DIT_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
# Mamba blocks have no MLP, so S, L and XL double DiT's depth at DiT's width (37M, 494M, 726M
# parameters at 32x32x4); B keeps DiT-B's width and takes the depth that gives the paper's
# 111M Mamba backbone (112.6M).
SSM_SIZES = {
    "S": dict(depth=24, hidden_size=384),
    "B": dict(depth=19, hidden_size=768),
    "L": dict(depth=48, hidden_size=1024),
    "XL": dict(depth=56, hidden_size=1152),
}
# Patch 1 (listed last, so the first name stays DiT-S/2): LightningDiT's paper names.
PATCH_SIZES = (2, 4, 8, 1)
# family -> (class, sizes, fixed arguments). LightningDiT (Yao et al. 2025) is DiT's sizes with
# the modern block as its released config (configs/lightningdit_xl_vavae_f16d32.yaml: SwiGLU,
# RoPE, RMSNorm, adaLN with shift, no QK-norm); the paper's names are at patch 1 on 16x16
# latents (LightningDiT-XL/1). S and patches 4, 8 are ours.
FAMILIES = {
    "DiT": (DiT, DIT_SIZES, {}),
    "SSM": (SSM, SSM_SIZES, {}),
    "LightningDiT": (DiT, DIT_SIZES, {"block": "modern", "qk_norm": False}),
}

_NAME = re.compile(r"^(?P<family>[A-Za-z]+)-(?P<size>[A-Z]+)/(?P<patch>\d+)$")


def model_names() -> list[str]:
    return [f"{fam}-{size}/{p}" for fam, (_, sizes, _) in FAMILIES.items() for size in sizes for p in PATCH_SIZES]


def model_spec(name: str) -> tuple[type[nnx.Module], dict]:
    """The class and constructor arguments a name stands for; ValueError for unknown names."""
    match = _NAME.match(name)
    family = FAMILIES.get(match["family"]) if match else None
    if family is None or match["size"] not in family[1] or int(match["patch"]) not in PATCH_SIZES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(model_names())}")
    cls, sizes, fixed = family
    return cls, dict(sizes[match["size"]], patch_size=int(match["patch"]), **fixed)


def create_model(
    name: str,
    *,
    input_size: int,
    in_channels: int,
    num_classes: int,
    out_channels: int | None = None,
    compute_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
    **overrides,
) -> nnx.Module:
    """Builds a named model; ``overrides`` replace size fields (depth, hidden_size, ...)."""
    cls, kwargs = model_spec(name)
    kwargs.update(overrides)
    return cls(
        input_size=input_size,
        in_channels=in_channels,
        out_channels=out_channels or in_channels,
        num_classes=num_classes,
        compute_dtype=compute_dtype,
        rngs=rngs,
        **kwargs,
    )
