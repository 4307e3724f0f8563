"""DiT (Peebles & Xie, 2023) with TREAD routing over its blocks, and a modern block option.

``block="modern"`` swaps the 2023 block for the LightningDiT recipe (Yao et al. 2025,
github.com/hustvl/LightningDiT ``models/lightningdit.py``): RMSNorm with a learned scale (also in
the final layer), optional QK-normalisation, 2-D axial rotary position embeddings (EVA-02's
layout) and a SwiGLU MLP, still conditioned by adaLN-Zero with shift. As LightningDiT, the fixed
sin-cos position table is still added to the patch tokens: RoPE comes on top of it. Under
routing the kept tokens keep their original grid coordinates for RoPE (and carry their table
entry with them). Same random weights, same outputs as LightningDiT's block and final layer
(tests/test_lightningdit_parity.py); its checkpoints differ only in layout (``w12`` is our
``gate`` and ``up`` concatenated, torch ``Linear`` weights transposed).
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tread_jax.models.backbone import Backbone
from tread_jax.models.layers import (
    apply_rope,
    dense,
    layer_norm,
    modulate,
    rms_norm,
    rope_angles_2d,
    zeros,
)

BLOCKS = ("dit", "modern")


class DiTBlock(nnx.Module):
    """Pre-norm transformer block conditioned by adaLN-Zero (scale, shift and gate per sample)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        *,
        attention_impl: str | None,
        rngs: nnx.Rngs,
    ):
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.attention_impl = attention_impl
        self.ada = dense(hidden_size, 6 * hidden_size, kernel_init=zeros, rngs=rngs)
        self.qkv = dense(hidden_size, 3 * hidden_size, rngs=rngs)
        self.attn_out = dense(hidden_size, hidden_size, rngs=rngs)
        self.fc1 = dense(hidden_size, mlp_hidden, rngs=rngs)
        self.fc2 = dense(mlp_hidden, hidden_size, rngs=rngs)

    def attention(self, x: jax.Array) -> jax.Array:
        # Unstacked along its own axis rather than moved to the front: a leading axis costs a
        # transpose of the activations and of their gradient.
        qkv = einops.rearrange(self.qkv(x), "b n (qkv h d) -> b n qkv h d", qkv=3, h=self.num_heads)
        q, k, v = jnp.unstack(qkv, axis=2)
        out = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
        return self.attn_out(einops.rearrange(out, "b n h d -> b n (h d)"))

    def mlp(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.ada(jax.nn.silu(c)), 6, axis=-1)
        x = x + gate1[:, None] * self.attention(modulate(layer_norm(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(layer_norm(x), shift2, scale2))


class ModernDiTBlock(nnx.Module):
    """adaLN-Zero block with RMSNorm (learned scale, eps 1e-6), optional QK-norm (the same RMSNorm
    per head), 2-D RoPE on queries and keys after QK-norm, and a SwiGLU MLP of
    ``int(2/3 * int(mlp_ratio * D))`` hidden units (the parameter count of the GELU MLP it
    replaces), biases everywhere, as LightningDiT's ``LightningDiTBlock``."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        *,
        attention_impl: str | None,
        qk_norm: bool = True,
        rngs: nnx.Rngs,
    ):
        if hidden_size % num_heads or (hidden_size // num_heads) % 4:
            raise ValueError(f"hidden_size {hidden_size} / num_heads {num_heads} must give a head "
                             "dimension divisible by 4 (2-D RoPE)")
        head_dim = hidden_size // num_heads
        mlp_hidden = int(2 * int(hidden_size * mlp_ratio) / 3)
        self.num_heads = num_heads
        self.attention_impl = attention_impl
        self.ada = dense(hidden_size, 6 * hidden_size, kernel_init=zeros, rngs=rngs)
        self.norm1 = nnx.Param(jnp.ones((hidden_size,), jnp.float32))
        self.norm2 = nnx.Param(jnp.ones((hidden_size,), jnp.float32))
        self.qkv = dense(hidden_size, 3 * hidden_size, rngs=rngs)
        self.q_norm = nnx.Param(jnp.ones((head_dim,), jnp.float32)) if qk_norm else None
        self.k_norm = nnx.Param(jnp.ones((head_dim,), jnp.float32)) if qk_norm else None
        self.attn_out = dense(hidden_size, hidden_size, rngs=rngs)
        self.gate = dense(hidden_size, mlp_hidden, rngs=rngs)
        self.up = dense(hidden_size, mlp_hidden, rngs=rngs)
        self.down = dense(mlp_hidden, hidden_size, rngs=rngs)

    def attention(self, x: jax.Array, angles: jax.Array | np.ndarray) -> jax.Array:
        qkv = einops.rearrange(self.qkv(x), "b n (qkv h d) -> b n qkv h d", qkv=3, h=self.num_heads)
        q, k, v = jnp.unstack(qkv, axis=2)
        if self.q_norm is not None:
            q, k = rms_norm(q, self.q_norm[...]), rms_norm(k, self.k_norm[...])
        q, k = apply_rope(q, angles), apply_rope(k, angles)
        out = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
        return self.attn_out(einops.rearrange(out, "b n h d -> b n (h d)"))

    def mlp(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))

    def __call__(self, x: jax.Array, c: jax.Array, angles: jax.Array | np.ndarray) -> jax.Array:
        """``angles``: the RoPE angles of the tokens ``x`` holds (``rope_angles_2d``)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.ada(jax.nn.silu(c)), 6, axis=-1)
        x = x + gate1[:, None] * self.attention(modulate(rms_norm(x, self.norm1[...]), shift1, scale1), angles)
        return x + gate2[:, None] * self.mlp(modulate(rms_norm(x, self.norm2[...]), shift2, scale2))


class DiT(Backbone):
    """Class-conditional diffusion transformer (DiT) over NHWC inputs."""

    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attention_impl: str | None = None,
        block: str = "dit",
        rope_theta: float = 10000.0,
        qk_norm: bool = True,
        rngs: nnx.Rngs,
        **trunk,
    ):
        """``trunk``: the :class:`Backbone` arguments (input_size, patch_size, depth, ...).
        ``block``: "dit" (the 2023 block) or "modern" (:class:`ModernDiTBlock`, with RoPE of base
        ``rope_theta`` and an RMSNorm final layer); ``qk_norm`` (modern only): QK-normalisation,
        which LightningDiT offers but its released configs turn off (``use_qknorm: false``)."""
        if block not in BLOCKS:
            raise ValueError(f"unknown block {block!r}; expected one of {BLOCKS}")
        super().__init__(hidden_size=hidden_size, rngs=rngs, final_norm="layer" if block == "dit" else "rms",
                         **trunk)
        self.block = block
        self.rope_theta = rope_theta
        self.head_dim = hidden_size // num_heads
        extra = {} if block == "dit" else {"qk_norm": qk_norm}
        block_class = DiTBlock if block == "dit" else ModernDiTBlock
        self.blocks = nnx.List(
            [
                block_class(hidden_size, num_heads, mlp_ratio, attention_impl=attention_impl, rngs=rngs, **extra)
                for _ in range(self.depth)
            ]
        )

    def block_args(self, i, positions, grid):
        del i
        if self.block == "dit":  # attention is permutation-equivariant; positions live in the tokens
            return ()
        # RoPE: the grid coordinates of the tokens the blocks hold, original ones under routing.
        positions = np.arange(grid[0] * grid[1]) if positions is None else positions
        return (rope_angles_2d(positions // grid[1], positions % grid[1], self.head_dim, self.rope_theta),)
