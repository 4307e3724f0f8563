"""The trunk every diffusion backbone shares, with TREAD routing over its blocks."""

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
    sincos_pos_embed_2d,
    unpatchify,
)


class Backbone(nnx.Module):
    """Patch and position embedding, timestep + label conditioning, routed blocks, final layer.

    Subclasses build ``self.blocks`` and define ``run_block``. ``noise_labels`` are whatever the
    objective feeds the timestep embedder (EDM: ln(sigma)/4); label ``num_classes`` is the null
    class. Routing is applied only when ``routes`` are given (training, or sparse guidance).
    """

    keep_order = False  # True for blocks that depend on token order (scans)

    def __init__(
        self,
        *,
        input_size: int,
        patch_size: int,
        in_channels: int,
        out_channels: int,
        hidden_size: int,
        depth: int,
        num_classes: int,
        compute_dtype: jnp.dtype = jnp.float32,
        float32_after_route: bool = True,
        timestep_freq_shift: int = 0,
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
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels, rngs=rngs)

    def run_block(
        self, i: int, h: jax.Array, c: jax.Array, positions: jax.Array | None, grid: tuple[int, int]
    ) -> jax.Array:
        """Block ``i`` on tokens ``h`` (``positions``: see ``routing.apply_blocks``)."""
        raise NotImplementedError

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

        def block_fn(i: int, h: jax.Array, positions: jax.Array | None) -> jax.Array:
            if i in after_route:  # as the published code: the block that re-merges runs in float32
                out = self.run_block(i, h.astype(jnp.float32), c.astype(jnp.float32), positions, grid)
                return out.astype(h.dtype)
            return self.run_block(i, h, c, positions, grid)

        tokens = routing.apply_blocks(
            block_fn, tokens, self.depth, routes, route_key, keep_order=self.keep_order
        )
        out = self.final_layer(tokens, c)
        return unpatchify(out, self.patch_size, height, width).astype(jnp.float32)
