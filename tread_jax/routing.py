"""TREAD token routing as a pure transform over a sequence of blocks.

A route ``(start, end, ratio)`` lets a random ``floor(N * ratio)`` of the N tokens of every
sample skip blocks ``start..end`` (0-based, inclusive). The kept tokens are gathered before
block ``start`` and, after block ``end``, scattered back into a copy of the sequence taken at
the input of block ``start``: the routed tokens re-enter with the values they had there.
Nothing here holds state; randomness comes from an explicit key, so a loss function can
rebuild exactly the same selection from the same key.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

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


def kept_indices(
    key: jax.Array,
    routes: Sequence[Route],
    batch_size: int,
    num_tokens: int,
    *,
    keep_order: bool = False,
) -> tuple[jax.Array, ...]:
    """One ``[B, K_r]`` index array per route, each drawn from its own fold of ``key``."""
    return tuple(
        select_tokens(jax.random.fold_in(key, i), batch_size, num_tokens, r.ratio, keep_order=keep_order)
        for i, r in enumerate(routes)
    )


def gather_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x[b, idx[b]]`` for every sample: ``[B, N, D], [B, K] -> [B, K, D]``."""
    return jnp.take_along_axis(x, idx[..., None], axis=1)


def scatter_tokens(full: jax.Array, kept: jax.Array, idx: jax.Array) -> jax.Array:
    """Writes ``kept[b]`` into ``full[b, idx[b]]``; the other tokens keep ``full``'s values."""
    batch = jnp.arange(full.shape[0])[:, None]
    return full.at[batch, idx].set(kept.astype(full.dtype), unique_indices=True)


def apply_blocks(
    run_blocks: Callable[[range, jax.Array, jax.Array | None], jax.Array],
    x: jax.Array,
    depth: int,
    routes: Sequence[Route],
    key: jax.Array | None,
    *,
    keep_order: bool = False,
) -> jax.Array:
    """Runs blocks ``0..depth-1`` over ``x: [B, N, D]`` as stretches ``run_blocks(blocks, x, positions)``.

    Each call covers a ``range`` of consecutive blocks that see the same tokens: a whole route,
    or a dense stretch between routes (so a caller may scan over a stretch's layers).
    ``positions`` is ``None`` where the blocks see the whole sequence, and inside a route the
    ``[B, K]`` original positions of the kept tokens (for blocks that depend on token order,
    such as scans). Routes that drop no token (ratio 0, or too few tokens) run densely, bit for
    bit.
    """
    routes = active_routes(validate_routes(routes, depth), x.shape[1])
    if routes and key is None:
        raise ValueError("routing needs a route_key")
    indices = kept_indices(key, routes, x.shape[0], x.shape[1], keep_order=keep_order) if routes else ()
    start = 0
    for route, idx in zip(routes, indices):
        if start < route.start:
            x = run_blocks(range(start, route.start), x, None)
        kept = run_blocks(range(route.start, route.end + 1), gather_tokens(x, idx), idx)
        x = scatter_tokens(x, kept, idx)
        start = route.end + 1
    if start < depth:
        x = run_blocks(range(start, depth), x, None)
    return x


def blocks_after_routes(routes: Sequence[Route], num_tokens: int) -> frozenset[int]:
    """Indices of the blocks that directly follow an active route's end."""
    return frozenset(r.end + 1 for r in active_routes(routes, num_tokens))
