"""The trunk every diffusion backbone shares, with TREAD routing over its blocks."""

from __future__ import annotations

from collections.abc import Callable

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
    label ``num_classes`` is the null class. Routing is applied only when a ``route_plan`` is
    given (training, or sparse guidance); the forward is one loop over ``routing.stretches``.

    ``scan_blocks`` runs each stretch of consecutive blocks that see the same tokens as one
    ``lax.scan`` over their parameters, stacked at call time, so the program holds one block per
    stretch instead of one per layer; the stored parameters keep their per-block layout, so
    checkpoints and weight conversion do not depend on it. On XLA:CPU it compiles DiT-XL/2's
    step slower, not faster (benchmarks/README.md); it is there for accelerators, where it is
    not measured yet. ``remat`` is a key of ``REMAT_POLICIES``.
    """

    keep_order = False  # True for blocks that depend on token order (scans)
    absolute_positions = True  # False for blocks that position tokens themselves (RoPE)
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

    def num_tokens(self, height: int, width: int) -> int:
        """Tokens of a ``height x width`` input: the ``num_tokens`` of its route plans."""
        return (height // self.patch_size) * (width // self.patch_size)

    def block_args(self, i: int, positions: jax.Array | None, grid: tuple[int, int]) -> tuple:
        """Arguments of block ``i`` after ``(tokens, conditioning)``; ``positions`` is a stretch's
        ``kept`` (``routing.Stretch``). Static (numpy) values stay static: they are closed over,
        never traced."""
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
        # Its other arguments are closed over: passed through jax.checkpoint they would become
        # tracers, and a static scan order would lose its static path.
        graphdef, _ = nnx.split(self.blocks[blocks[0]])

        def functional(args: tuple) -> Callable[[nnx.State, jax.Array], jax.Array]:
            def call(state: nnx.State, h: jax.Array) -> jax.Array:
                return nnx.merge(graphdef, state)(h, c, *args)

            return call if policy is None else jax.checkpoint(call, policy=policy)

        if not scan:
            for i in blocks:
                h = functional(self.block_args(i, positions, grid))(nnx.state(self.blocks[i]), h)
            return h
        # Blocks of one stretch share their arguments (``scannable``), so they stack.
        call = functional(self.block_args(blocks[0], positions, grid))
        stacked = jax.tree.map(lambda *w: jnp.stack(w), *(nnx.state(self.blocks[i]) for i in blocks))
        h, _ = jax.lax.scan(lambda h, state: (call(state, h), None), h, stacked)
        return h

    def __call__(
        self,
        x: jax.Array,
        noise_labels: jax.Array,
        class_labels: jax.Array,
        *,
        route_plan: routing.RoutePlan | None = None,
    ) -> jax.Array:
        """``[B, H, W, C]`` inputs to float32 outputs; ``route_plan`` (``routing.draw_plan``, with
        ``keep_order=self.keep_order``) routes the tokens, ``None`` runs densely."""
        _, height, width, _ = x.shape
        grid = (height // self.patch_size, width // self.patch_size)
        if route_plan is not None:
            num_tokens = self.num_tokens(height, width)
            routing.check_plan(route_plan, depth=self.depth, num_tokens=num_tokens, keep_order=self.keep_order)
        pos = sincos_pos_embed_2d(self.hidden_size, *grid)
        tokens = self.patch_embed(x.astype(self.compute_dtype))
        if self.absolute_positions:
            tokens = tokens + pos.astype(self.compute_dtype)
        c = (self.t_embedder(noise_labels) + self.y_embedder(class_labels)).astype(self.compute_dtype)
        for stretch in routing.stretches(
            route_plan, self.depth, self.compute_dtype, float32_rejoin=self.float32_after_route
        ):
            h = stretch.gather(tokens)
            h = self.run_blocks(stretch.blocks, h, c.astype(stretch.dtype), stretch.kept, grid)
            tokens = stretch.scatter(tokens, h)
        out = self.final_layer(tokens, c)
        return unpatchify(out, self.patch_size, height, width).astype(jnp.float32)
