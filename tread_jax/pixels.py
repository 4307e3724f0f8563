"""The one conversion of [-1, 1] images to uint8 pixels, for saved samples, grids and scoring."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def to_uint8(images: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """``clip(127.5 x + 128, 0, 255)`` truncated to uint8: the convention of DiT's and EDM's
    sampling scripts, whose samples the reference evaluators score. numpy in, numpy out; a jax
    array (or tracer) in, a jax array out."""
    xp = jnp if isinstance(images, jax.Array) else np
    return xp.clip(xp.asarray(images, xp.float32) * 127.5 + 128.0, 0, 255).astype(xp.uint8)
