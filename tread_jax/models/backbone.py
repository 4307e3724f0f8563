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


# Activation checkpointing (``remat``) policies: which block intermediates the backward pass
# keeps instead of recomputing. "dots" keeps the matmul outputs and recomputes the cheap
# elementwise work; "full" keeps only each block's input.
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class Backbone(nnx.Module):
    """Patch and position embedding, timestep + label conditioning, routed blocks, final layer.

    Subclasses build ``self.blocks`` (one module per block) and define ``block_args``.
    ``noise_labels`` are whatever the objective feeds the timestep embedder (EDM: ln(sigma)/4);
    label ``num_classes`` is the null class. Routing is applied only when ``routes`` are given
    (training, or sparse guidance).

    ``scan_blocks`` runs each stretch of consecutive blocks that see the same tokens as one
    ``lax.scan`` over their parameters, stacked at call time, so the program holds one block per
    stretch instead of one per layer; the stored parameters keep their per-block layout, so
    checkpoints and weight conversion do not depend on it. On XLA:CPU it compiles DiT-XL/2's
    step slower, not faster (benchmarks/README.md); it is there for accelerators, where it is
    not measured yet. ``remat`` is a key of ``REMAT_POLICIES``.
    """

    keep_order = False  # True for blocks that depend on token order (scans)
    scannable = True  # False where blocks differ in more than their weights

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
        scan_blocks: bool = False,
        remat: str = "none",
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
        if scan_blocks and not self.scannable:
            raise ValueError(f"{type(self).__name__} blocks differ by more than their weights; "
                             "scan_blocks is not supported")
        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; known: {', '.join(REMAT_POLICIES)}")
        self.scan_blocks = scan_blocks
        self.remat = remat
        self.patch_embed = PatchEmbed(patch_size, in_channels, hidden_size, rngs=rngs)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=timestep_freq_shift, rngs=rngs)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, rngs=rngs)
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels, rngs=rngs)

    def block_args(self, i: int, positions: jax.Array | None, grid: tuple[int, int]) -> tuple:
        """Arguments of block ``i`` after ``(tokens, conditioning)`` (``positions``: see
        ``routing.apply_blocks``)."""
        raise NotImplementedError

    def run_blocks(
        self, blocks: range, h: jax.Array, c: jax.Array, positions: jax.Array | None, grid: tuple[int, int]
    ) -> jax.Array:
        """Blocks ``blocks`` in order on tokens ``h``, scanned and rematerialised as configured."""
        policy = REMAT_POLICIES[self.remat]
        scan = self.scan_blocks and len(blocks) > 1
        if policy is None and not scan:
            for i in blocks:
                h = self.blocks[i](h, c, *self.block_args(i, positions, grid))
            return h

        # Functional form of a block (its state as an argument), for jax.checkpoint and lax.scan.
        graphdef, _ = nnx.split(self.blocks[blocks[0]])

        def call(state: nnx.State, h: jax.Array, *args) -> jax.Array:
            return nnx.merge(graphdef, state)(h, c, *args)

        if policy is not None:
            call = jax.checkpoint(call, policy=policy)
        if not scan:
            for i in blocks:
                h = call(nnx.state(self.blocks[i]), h, *self.block_args(i, positions, grid))
            return h
        # Blocks of one stretch share their arguments (``scannable``), so they stack.
        args = self.block_args(blocks[0], positions, grid)
        stacked = jax.tree.map(lambda *w: jnp.stack(w), *(nnx.state(self.blocks[i]) for i in blocks))
        h, _ = jax.lax.scan(lambda h, state: (call(state, h, *args), None), h, stacked)
        return h

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

        def run_blocks(blocks: range, h: jax.Array, positions: jax.Array | None) -> jax.Array:
            if blocks[0] in after_route:  # as the published code: the block that re-merges runs in float32
                first = blocks[:1]
                h = self.run_blocks(first, h.astype(jnp.float32), c.astype(jnp.float32), positions, grid)
                h, blocks = h.astype(c.dtype), blocks[1:]
            return self.run_blocks(blocks, h, c, positions, grid) if blocks else h

        tokens = routing.apply_blocks(
            run_blocks, tokens, self.depth, routes, route_key, keep_order=self.keep_order
        )
        out = self.final_layer(tokens, c)
        return unpatchify(out, self.patch_size, height, width).astype(jnp.float32)
