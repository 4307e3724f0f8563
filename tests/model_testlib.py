"""Helpers for tests of small models."""

import jax
from flax import nnx


def randomize(model: nnx.Module, seed: int = 1) -> nnx.Module:
    """DiT starts with zero adaLN and output layers; give every parameter a value (in place)."""
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(
        treedef, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]))
    return model
