"""Version-1 TREAD loss: denoising loss over each route's kept tokens, plus an optional
MAE-style term over its routed tokens (MaskDiT convention). The default (version 3) loss is the
plain mean of the per-element loss over every token; the trainer chooses.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from tread_jax.models.layers import patchify


def token_loss(per_element_loss: jax.Array, patch_size: int) -> jax.Array:
    """Mean of ``f32[B,H,W,C]`` over each patch: ``f32[B,N]``, tokens in the model's patchify order."""
    if per_element_loss.ndim != 4:
        raise ValueError(f"per_element_loss must be [B, H, W, C], got shape {per_element_loss.shape}")
    _, h, w, _ = per_element_loss.shape
    if patch_size < 1 or h % patch_size or w % patch_size:
        raise ValueError(f"patch_size {patch_size} does not tile a {h}x{w} image")
    return patchify(per_element_loss, patch_size).mean(axis=-1)


def routed_loss(per_token_loss: jax.Array, kept_indices: Sequence[jax.Array], mae_coef: float = 0.0) -> jax.Array:
    """Scalar version-1 loss.

    ``mean_r(mean of loss over route r's kept tokens) + mae_coef * mean_r(mean over its routed
    tokens)``. ``kept_indices`` holds one i32[B, K_r] per route (``routing.RoutePlan.kept``: the
    selection the model used, each row a set of distinct tokens). A route that routes nothing
    adds 0 to the MAE term. With no routes (a dense step) every token is kept and the result is
    the plain mean.
    """
    if per_token_loss.ndim != 2:
        raise ValueError(f"per_token_loss must be [B, N], got shape {per_token_loss.shape}")
    if mae_coef < 0:
        raise ValueError(f"mae_coef must be >= 0, got {mae_coef}")
    batch, num_tokens = per_token_loss.shape
    for idx in kept_indices:
        if idx.ndim != 2 or idx.shape[0] != batch or not 0 < idx.shape[1] <= num_tokens:
            raise ValueError(f"kept indices must be [B={batch}, K] with 0 < K <= {num_tokens}, got {idx.shape}")
    if not kept_indices:
        return per_token_loss.mean()

    rows = jnp.arange(batch)[:, None]
    kept_terms, routed_terms = [], []
    for idx in kept_indices:
        kept = jnp.zeros((batch, num_tokens), bool).at[rows, idx].set(True)
        num_kept = idx.shape[1]
        kept_terms.append(jnp.where(kept, per_token_loss, 0.0).sum() / (batch * num_kept))
        if num_kept < num_tokens:
            routed_terms.append(jnp.where(kept, 0.0, per_token_loss).sum() / (batch * (num_tokens - num_kept)))
    loss = sum(kept_terms) / len(kept_indices)
    if mae_coef and routed_terms:
        loss = loss + mae_coef * sum(routed_terms) / len(kept_indices)
    return loss
