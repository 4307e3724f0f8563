"""Analytic multiply-accumulate counts for DiT, dense and routed, and for DINOv2.

Counts the matrix multiplications (the MACs the DiT paper reports as "GFLOPs"); elementwise
work, softmax and normalisation are left out, as in the paper. Per-block counts take the number
of tokens the block sees, so a routed forward costs what its kept tokens cost.
"""

from __future__ import annotations

from collections.abc import Sequence

from tread_jax import routing
from tread_jax.models.dinov2 import DinoV2Config
from tread_jax.models.dit import DiT


def mlp_macs_per_token(block) -> int:
    """MACs per token of a block's MLP: DiT's GELU MLP (fc1, fc2) or the modern block's SwiGLU
    (gate, up, down)."""
    if hasattr(block, "gate"):
        return 3 * block.gate.in_features * block.gate.out_features
    return 2 * block.fc1.in_features * block.fc1.out_features


def transformer_block_macs(num_tokens: int, hidden_size: int, mlp_macs: int) -> int:
    """MACs of one pre-norm transformer block (attention and MLP) for one sample of
    ``num_tokens`` tokens (``mlp_macs`` per token): DINOv2's block, and DiT's without adaLN."""
    n, d = num_tokens, hidden_size
    projections = n * (3 * d * d + d * d + mlp_macs)  # qkv, attention out, MLP
    attention = 2 * n * n * d  # q @ k^T and weights @ v over all heads
    return projections + attention


def dit_block_macs(num_tokens: int, hidden_size: int, mlp_macs: int) -> int:
    """MACs of one DiT block for one sample of ``num_tokens`` tokens (``mlp_macs`` per token)."""
    ada = hidden_size * 6 * hidden_size  # per sample, not per token
    return ada + transformer_block_macs(num_tokens, hidden_size, mlp_macs)


def block_tokens(depth: int, num_tokens: int, routes: Sequence[routing.Route]) -> list[int]:
    """Tokens each of ``depth`` blocks sees with ``routes`` applied to ``num_tokens``."""
    tokens = [num_tokens] * depth
    for r in routing.active_routes(routing.validate_routes(routes, depth), num_tokens):
        for i in range(r.start, r.end + 1):
            tokens[i] = routing.num_kept(num_tokens, r.ratio)
    return tokens


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
    tokens = block_tokens(model.depth, n, routes)
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


def dinov2_forward_macs(config: DinoV2Config, image_size: int) -> int:
    """MACs of one DINOv2 forward pass for one ``image_size`` image: patch embedding and blocks
    over the class token, the registers and the patch tokens (ViT-B/14 at 224: 23.16 G)."""
    grid, d = image_size // config.patch_size, config.hidden_size
    n = 1 + config.num_register_tokens + grid * grid
    patch = grid * grid * 3 * config.patch_size ** 2 * d
    mlp = 2 * d * int(d * config.mlp_ratio)
    return patch + config.num_hidden_layers * transformer_block_macs(n, d, mlp)
