"""DiT (Peebles & Xie, 2023) with TREAD routing over its blocks."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tread_jax import routing
from tread_jax.models.layers import (
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    dense,
    layer_norm,
    modulate,
    sincos_pos_embed_2d,
    unpatchify,
    zeros,
)


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
        b, n, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, n, 3 * self.num_heads, d // self.num_heads), 3, axis=2)
        out = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
        return self.attn_out(out.reshape(b, n, d))

    def mlp(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.ada(jax.nn.silu(c)), 6, axis=-1)
        x = x + gate1[:, None] * self.attention(modulate(layer_norm(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(layer_norm(x), shift2, scale2))


class DiT(nnx.Module):
    """Class-conditional diffusion transformer over NHWC inputs.

    ``noise_labels`` are whatever the objective feeds the timestep embedder (EDM: ln(sigma)/4).
    Label ``num_classes`` is the null class. Routing is applied only when ``routes`` are given.
    """

    def __init__(
        self,
        *,
        input_size: int,
        patch_size: int,
        in_channels: int,
        out_channels: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        num_classes: int,
        mlp_ratio: float = 4.0,
        compute_dtype: jnp.dtype = jnp.float32,
        float32_after_route: bool = True,
        timestep_freq_shift: int = 0,
        attention_impl: str | None = None,
        rngs: nnx.Rngs,
    ):
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_classes = num_classes
        self.compute_dtype = jnp.dtype(compute_dtype)
        self.float32_after_route = float32_after_route
        self.patch_embed = PatchEmbed(patch_size, in_channels, hidden_size, rngs=rngs)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=timestep_freq_shift, rngs=rngs)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, rngs=rngs)
        self.blocks = nnx.List(
            [
                DiTBlock(hidden_size, num_heads, mlp_ratio, attention_impl=attention_impl, rngs=rngs)
                for _ in range(depth)
            ]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        noise_labels: jax.Array,
        class_labels: jax.Array,
        *,
        routes: Sequence[routing.Route] = (),
        route_key: jax.Array | None = None,
    ) -> jax.Array:
        _, height, width, _ = x.shape
        grid = (height // self.patch_size, width // self.patch_size)
        pos = sincos_pos_embed_2d(self.hidden_size, *grid)
        tokens = self.patch_embed(x.astype(self.compute_dtype)) + pos.astype(self.compute_dtype)
        c = (self.t_embedder(noise_labels) + self.y_embedder(class_labels)).astype(self.compute_dtype)

        after_route = frozenset()
        if self.float32_after_route and self.compute_dtype != jnp.float32:
            after_route = routing.blocks_after_routes(routes, tokens.shape[1])

        def block_fn(i: int, h: jax.Array) -> jax.Array:
            if i in after_route:  # as the published code: the block that re-merges runs in float32
                return self.blocks[i](h.astype(jnp.float32), c.astype(jnp.float32)).astype(h.dtype)
            return self.blocks[i](h, c)

        tokens = routing.apply_blocks(block_fn, tokens, self.depth, routes, route_key)
        out = self.final_layer(tokens, c)
        return unpatchify(out, self.patch_size, height, width).astype(jnp.float32)
