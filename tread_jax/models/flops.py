"""Analytic multiply-accumulate counts for DiT, dense and routed.

Counts the matrix multiplications (the MACs the DiT paper reports as "GFLOPs"); elementwise
work, softmax and normalisation are left out, as in the paper. Per-block counts take the number
of tokens the block sees, so a routed forward costs what its kept tokens cost.
"""

from __future__ import annotations

from collections.abc import Sequence

from tread_jax import routing
from tread_jax.models.dit import DiT


def mlp_macs_per_token(block) -> int:
    """MACs per token of a block's MLP: DiT's GELU MLP (fc1, fc2) or the modern block's SwiGLU
    (gate, up, down)."""
    if hasattr(block, "gate"):
        return 3 * block.gate.in_features * block.gate.out_features
    return 2 * block.fc1.in_features * block.fc1.out_features


def dit_block_macs(num_tokens: int, hidden_size: int, mlp_macs: int) -> int:
    """MACs of one DiT block for one sample of ``num_tokens`` tokens (``mlp_macs`` per token)."""
    n, d = num_tokens, hidden_size
    ada = d * 6 * d  # per sample, not per token
    projections = n * (3 * d * d + d * d + mlp_macs)  # qkv, attention out, MLP
    attention = 2 * n * n * d  # q @ k^T and weights @ v over all heads
    return ada + projections + attention


def dit_forward_macs(
    model: DiT, height: int, width: int, routes: Sequence[routing.Route] = (), *, skip_fused: bool = False
) -> int:
    """MACs of one forward pass for one ``height x width`` sample, with ``routes`` applied.

    A model with a SPRINT span adds its fusion (``N x 2D x D``); ``skip_fused`` leaves the span's
    blocks out (path-drop guidance's weak branch). ``model`` may be abstract
    (``nnx.eval_shape``): only its shapes are read.
    """
    p, d = model.patch_size, model.hidden_size
    n = (height // p) * (width // p)
    tokens = [n] * model.depth
    for r in routing.active_routes(routing.validate_routes(routes, model.depth), n):
        for i in range(r.start, r.end + 1):
            tokens[i] = routing.num_kept(n, r.ratio)
    span = getattr(model, "sprint_span", None)
    if skip_fused and span is None:
        raise ValueError("skip_fused needs a model with a SPRINT span")
    run = [not (skip_fused and span[0] <= i <= span[1]) for i in range(model.depth)]
    mlp_macs = mlp_macs_per_token(model.blocks[0])
    patch = n * model.patch_embed.proj.in_features * d
    timestep = model.t_embedder.freq_dim * d + d * d
    final = d * 2 * d + n * d * model.final_layer.proj.out_features
    fusion = n * 2 * d * d if span is not None else 0
    blocks = sum(dit_block_macs(k, d, mlp_macs) for k, r in zip(tokens, run) if r)
    return patch + timestep + blocks + fusion + final
