"""DiT (Peebles & Xie, 2023) with TREAD routing over its blocks."""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from tread_jax.models.backbone import Backbone
from tread_jax.models.layers import dense, layer_norm, modulate, zeros


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


class DiT(Backbone):
    """Class-conditional diffusion transformer (DiT) over NHWC inputs."""

    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attention_impl: str | None = None,
        rngs: nnx.Rngs,
        **trunk,
    ):
        """``trunk``: the :class:`Backbone` arguments (input_size, patch_size, depth, ...)."""
        super().__init__(hidden_size=hidden_size, rngs=rngs, **trunk)
        self.blocks = nnx.List(
            [
                DiTBlock(hidden_size, num_heads, mlp_ratio, attention_impl=attention_impl, rngs=rngs)
                for _ in range(self.depth)
            ]
        )

    def block_args(self, i, positions, grid):
        del i, positions, grid  # attention is permutation-equivariant; positions live in the tokens
        return ()
