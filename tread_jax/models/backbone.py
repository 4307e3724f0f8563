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
    dense,
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

    ``sprint_span = (start, end)`` makes blocks ``start..end`` a SPRINT span (Park et al.,
    arXiv 2510.21986; ``routing.sprint_rejoin``): the backbone then owns a learned mask token
    ``[D]`` and the fusion ``Linear(2D -> D)``, and applies the fusion in every forward pass,
    routed or dense. These ``2 D^2 + 2 D`` parameters are all SPRINT adds.

    ``scan_blocks`` runs each stretch of consecutive blocks that see the same tokens as one
    ``lax.scan`` over their parameters, stacked at call time, so the program holds one block per
    stretch instead of one per layer; the stored parameters keep their per-block layout, so
    checkpoints and weight conversion do not depend on it. On XLA:CPU it compiles DiT-XL/2's
    step slower, not faster (benchmarks/README.md); it is there for accelerators, where it is
    not measured yet. ``remat`` is a key of ``REMAT_POLICIES``. ``final_norm``: the final
    layer's norm (``FinalLayer``).

    ``repa_depth=k`` (REPA, ``tread_jax.diffusion.repa``) also returns the tokens coming out of
    block ``k`` (1-based): the stretch holding that block is run in two parts, which changes
    nothing else. Inside a route these are the kept tokens only, in the order of the stretch's
    ``kept`` (``repa.aligned_positions``), before they rejoin the sequence. Inside a skipped
    SPRINT span (path-drop guidance) there are none: ValueError.
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
        sprint_span: tuple[int, int] | None = None,
        final_norm: str = "layer",
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
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels, norm=final_norm, rngs=rngs)
        self.sprint_span = None if sprint_span is None else tuple(int(b) for b in sprint_span)
        if self.sprint_span is not None:
            routing.validate_routes((routing.Route(*self.sprint_span, 0.0, rejoin="sprint"),), depth)
            # As the published code: mask token ~ N(0, 0.02^2); the fusion a xavier-initialised Linear.
            self.sprint_mask_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (hidden_size,)))
            self.sprint_fusion = dense(2 * hidden_size, hidden_size, rngs=rngs)

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
        if not blocks:  # the REPA hook can split a stretch after its last block
            return h
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
        repa_depth: int | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """``[B, H, W, C]`` inputs to float32 outputs; ``route_plan`` (``routing.draw_plan``, with
        ``keep_order=self.keep_order``) routes the tokens, ``None`` runs densely. With
        ``repa_depth`` (1-based block) returns ``(outputs, tokens after that block)``."""
        if repa_depth is not None and not 1 <= repa_depth <= self.depth:
            raise ValueError(f"repa_depth must be a block of 1..{self.depth} (1-based), got {repa_depth}")
        _, height, width, _ = x.shape
        grid = (height // self.patch_size, width // self.patch_size)
        if route_plan is not None:
            num_tokens = self.num_tokens(height, width)
            routing.check_plan(route_plan, depth=self.depth, num_tokens=num_tokens, keep_order=self.keep_order,
                               fused_span=self.sprint_span)
        pos = sincos_pos_embed_2d(self.hidden_size, *grid)
        tokens = self.patch_embed(x.astype(self.compute_dtype)) + pos.astype(self.compute_dtype)
        c = (self.t_embedder(noise_labels) + self.y_embedder(class_labels)).astype(self.compute_dtype)
        fusion = None
        if self.sprint_span is not None:
            fusion = (self.sprint_mask_token[...], self.sprint_fusion)
        hooked = None
        for stretch in routing.stretches(route_plan, self.depth, self.compute_dtype,
                                         float32_rejoin=self.float32_after_route, fused_span=self.sprint_span):
            hook = repa_depth is not None and (repa_depth - 1) in stretch.blocks
            if hook and stretch.skip:
                raise ValueError(f"repa_depth {repa_depth} lies in the SPRINT span {self.sprint_span}, which this "
                                 "route plan skips: there are no tokens to align")
            h = None
            if not stretch.skip:
                h = stretch.gather(tokens)
                cond = c.astype(stretch.dtype)
                if hook:
                    split = stretch.blocks.index(repa_depth - 1) + 1
                    h = hooked = self.run_blocks(stretch.blocks[:split], h, cond, stretch.kept, grid)
                    h = self.run_blocks(stretch.blocks[split:], h, cond, stretch.kept, grid)
                else:
                    h = self.run_blocks(stretch.blocks, h, cond, stretch.kept, grid)
            tokens = stretch.scatter(tokens, h, fusion)
        out = self.final_layer(tokens, c)
        out = unpatchify(out, self.patch_size, height, width).astype(jnp.float32)
        return out if repa_depth is None else (out, hooked)
