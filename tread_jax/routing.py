"""TREAD token routing: the whole method, as data a backbone's forward loops over.

A route ``(start, end, ratio)`` lets a random ``floor(N * ratio)`` of the N tokens of every
sample skip blocks ``start..end`` (0-based, inclusive). The kept tokens are gathered before
block ``start`` and, after block ``end``, scattered back into a copy of the sequence taken at
the input of block ``start``: the routed tokens re-enter with the values they had there. The
block right after a route runs in float32 when the model computes in a lower precision.
``docs/method.md`` gives the exact definition and defaults.

``draw_plan`` draws the kept tokens (a ``RoutePlan``, from an explicit key) and ``stretches``
turns a plan into the forward pass: which blocks run together, on which tokens, in which
dtype. A backbone's forward is a plain loop over the stretches, so a new backbone gets the
whole method by writing that loop.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Route:
    """Blocks ``start..end`` (inclusive) see only ``N - floor(N * ratio)`` of the tokens."""

    start: int
    end: int
    ratio: float = 0.5


def default_route(depth: int, ratio: float = 0.5) -> Route:
    """The published placement: blocks ``2 .. depth - 4`` (DiT-S/B 2->8, L 2->20, XL 2->24)."""
    return Route(2, depth - 4, ratio)


def parse_routes(spec: Iterable[Route | Mapping | Sequence] | None) -> tuple[Route, ...]:
    """Routes from a config value: Route objects, dicts with start/end/ratio, or tuples."""
    routes = []
    for item in spec or ():
        if isinstance(item, Route):
            routes.append(item)
        elif isinstance(item, Mapping):
            routes.append(Route(int(item["start"]), int(item["end"]), float(item.get("ratio", 0.5))))
        else:
            routes.append(Route(int(item[0]), int(item[1]), *(float(v) for v in item[2:])))
    return tuple(routes)


def validate_routes(routes: Sequence[Route], depth: int) -> tuple[Route, ...]:
    """Checks routes against a model of ``depth`` blocks; raises ValueError naming the problem."""
    routes = tuple(routes)
    for r in routes:
        if not 0 <= r.start <= r.end < depth:
            raise ValueError(
                f"route {r}: need 0 <= start <= end < depth={depth} (blocks are 0-based, inclusive)"
            )
        if not 0.0 <= r.ratio < 1.0:
            raise ValueError(f"route {r}: ratio is the routed fraction and must be in [0, 1)")
    for prev, nxt in zip(routes, routes[1:]):
        if nxt.start <= prev.end:
            raise ValueError(f"routes {prev} and {nxt} overlap or are not sorted by start")
    return routes


def num_kept(num_tokens: int, ratio: float) -> int:
    """Tokens that a route keeps: ``N - floor(N * ratio)``, a static count under jit."""
    return num_tokens - math.floor(num_tokens * ratio)


def active_routes(routes: Sequence[Route], num_tokens: int) -> tuple[Route, ...]:
    """Routes that drop at least one token; the others are exactly the dense computation."""
    return tuple(r for r in routes if num_kept(num_tokens, r.ratio) < num_tokens)


def select_tokens(
    key: jax.Array, batch_size: int, num_tokens: int, ratio: float, *, keep_order: bool = False
) -> jax.Array:
    """Per-sample uniform random subset: int32 ``[B, K]`` token indices to keep.

    With ``keep_order`` the indices are ascending, for models whose scan order matters.
    """
    noise = jax.random.uniform(key, (batch_size, num_tokens))
    kept = jnp.argsort(noise, axis=-1)[:, : num_kept(num_tokens, ratio)].astype(jnp.int32)
    return jnp.sort(kept, axis=-1) if keep_order else kept


def gather_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x[b, idx[b]]`` for every sample: ``[B, N, D], [B, K] -> [B, K, D]``."""
    return jnp.take_along_axis(x, idx[..., None], axis=1)


def scatter_tokens(full: jax.Array, kept: jax.Array, idx: jax.Array) -> jax.Array:
    """Writes ``kept[b]`` into ``full[b, idx[b]]``; the other tokens keep ``full``'s values."""
    batch = jnp.arange(full.shape[0])[:, None]
    return full.at[batch, idx].set(kept.astype(full.dtype), unique_indices=True)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["kept"], meta_fields=["routes", "num_tokens", "keep_order"]
)
@dataclasses.dataclass(frozen=True)
class RoutePlan:
    """The token selection of one routed forward pass: a pytree that passes through jit.

    ``routes`` (static) are the active routes, in order; ``kept`` holds one int32 ``[B, K_r]``
    array per route, the positions of the tokens that its blocks see (ascending with
    ``keep_order``). The version-1 loss reads ``kept``: the selection the model used.
    """

    routes: tuple[Route, ...]
    kept: tuple[jax.Array, ...]
    num_tokens: int
    keep_order: bool = False


def draw_plan(
    key: jax.Array,
    routes: Sequence[Route],
    *,
    batch_size: int,
    num_tokens: int,
    keep_order: bool = False,
) -> RoutePlan:
    """Draws each sample's kept tokens for ``routes``; routes that drop no token are left out.

    Route ``i`` of the active ones draws from ``fold_in(key, i)``. With ``keep_order`` (models
    whose blocks scan the tokens in order) the kept indices are ascending. Routes are checked
    against the model's depth where the plan is used.
    """
    active = active_routes(routes, num_tokens)
    kept = tuple(
        select_tokens(jax.random.fold_in(key, i), batch_size, num_tokens, r.ratio, keep_order=keep_order)
        for i, r in enumerate(active)
    )
    return RoutePlan(active, kept, num_tokens, keep_order)


def check_plan(plan: RoutePlan, *, depth: int, num_tokens: int, keep_order: bool) -> None:
    """ValueError unless ``plan`` fits a model of ``depth`` blocks over ``num_tokens`` tokens
    (and, for a model whose blocks scan in order, was drawn with ``keep_order``)."""
    validate_routes(plan.routes, depth)
    if plan.num_tokens != num_tokens:
        raise ValueError(f"route plan drawn for {plan.num_tokens} tokens, the model sees {num_tokens}")
    if keep_order and not plan.keep_order:
        raise ValueError("this model scans its tokens in order: draw the route plan with keep_order=True")
    for route, kept in zip(plan.routes, plan.kept, strict=True):
        count = num_kept(num_tokens, route.ratio)
        if kept.ndim != 2 or kept.shape[1] != count:
            raise ValueError(f"route {route}: kept indices {kept.shape} are not [B, {count}]")


@dataclasses.dataclass(frozen=True)
class Stretch:
    """Consecutive blocks that see the same tokens in the same dtype.

    ``kept``: ``None`` where the blocks see the whole sequence; inside a route the ``[B, K]``
    original positions of the kept tokens (blocks that depend on token order, such as scans,
    need them). ``dtype``: what the blocks compute in (float32 for the block that rejoins the
    routed tokens, else the model's compute dtype).
    """

    blocks: range
    kept: jax.Array | None
    dtype: jnp.dtype

    def gather(self, x: jax.Array) -> jax.Array:
        """The tokens of the full sequence ``x: [B, N, D]`` that the blocks see, in ``dtype``."""
        return (x if self.kept is None else gather_tokens(x, self.kept)).astype(self.dtype)

    def scatter(self, x: jax.Array, out: jax.Array) -> jax.Array:
        """The full sequence after the stretch, in ``x``'s dtype: ``out`` itself where the blocks
        saw every token; else the kept tokens written back into ``x`` (the sequence at the route's
        start), so the routed tokens rejoin with the values they had there."""
        return out.astype(x.dtype) if self.kept is None else scatter_tokens(x, out, self.kept)


def stretches(
    plan: RoutePlan | None, depth: int, compute_dtype: jnp.dtype, *, float32_rejoin: bool = True
) -> list[Stretch]:
    """The forward pass over blocks ``0..depth-1`` as stretches, in order.

    A backbone runs ``x = s.scatter(x, blocks(s.blocks, s.gather(x)))`` for each. With
    ``float32_rejoin`` (the published code's choice) the block right after a route computes in
    float32 when ``compute_dtype`` is lower: it is a stretch of its own. ``plan=None`` is dense.
    """
    compute_dtype = jnp.dtype(compute_dtype)
    rejoin_dtype = jnp.dtype(jnp.float32) if float32_rejoin else compute_dtype
    out: list[Stretch] = []

    def add(lo: int, hi: int, kept: jax.Array | None, after_route: bool) -> None:
        if lo < hi and after_route and rejoin_dtype != compute_dtype:
            out.append(Stretch(range(lo, lo + 1), kept, rejoin_dtype))
            lo += 1
        if lo < hi:
            out.append(Stretch(range(lo, hi), kept, compute_dtype))

    start, after_route = 0, False
    for route, kept in zip(plan.routes, plan.kept) if plan is not None else ():
        add(start, route.start, None, after_route)
        # A route that starts right after another: its first block is the one that rejoins (a
        # stretch of its own, which gathers again the tokens just scattered: the same values).
        add(route.start, route.end + 1, kept, after_route and start == route.start)
        start, after_route = route.end + 1, True
    add(start, depth, None, after_route)
    return out
