"""TREAD token routing: the whole method, as data a backbone's forward loops over.

A route ``(start, end, ratio)`` lets a random ``floor(N * ratio)`` of the N tokens of every
sample skip blocks ``start..end`` (0-based, inclusive). The kept tokens are gathered before
block ``start`` and, after block ``end``, scattered back into a copy of the sequence taken at
the input of block ``start``: the routed tokens re-enter with the values they had there. The
block right after a route runs in float32 when the model computes in a lower precision.
``docs/method.md`` gives the exact definition and defaults.

Two choices per route. Selection: a uniform random subset of all tokens (``group=0``, TREAD),
or SPRINT's structured mask (``group=g``: every g x g group of the token grid keeps the same
number of tokens, at random positions drawn per group and sample). Rejoin: TREAD's (the values
at the route's start; no parameters) or SPRINT's (``rejoin="sprint"``: the route's output is
scattered into a sequence of a learned mask token, concatenated with the sequence at the route's
start and fused by a Linear(2D -> D) that the backbone owns; the span is then part of the
architecture, fused even when every token runs through it).

``draw_plan`` draws the kept tokens (a ``RoutePlan``, from an explicit key) and ``stretches``
turns a plan into the forward pass: which blocks run together, on which tokens, in which
dtype. A backbone's forward is a plain loop over the stretches, so a new backbone gets the
whole method by writing that loop.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp


REJOINS = ("tread", "sprint")


@dataclasses.dataclass(frozen=True, repr=False)
class Route:
    """Blocks ``start..end`` (inclusive) see only ``N - floor(N * ratio)`` of the tokens.

    ``group``: 0 selects a uniform random subset; g > 0 SPRINT's structured mask, each g x g
    group of the token grid keeping ``g*g*(1 - ratio)`` tokens (a whole number). ``rejoin``:
    "tread" or "sprint" (module docstring). ``path_drop``: SPRINT only, the probability per
    training sample that the span's whole output is replaced by the mask token (what path-drop
    guidance's weak branch does at sampling; 0.1 in the published code).
    """

    start: int
    end: int
    ratio: float = 0.5
    group: int = 0
    rejoin: str = "tread"
    path_drop: float = 0.0

    def __repr__(self) -> str:
        # A TREAD route reads as before: fields at their defaults after ``ratio`` are left out.
        fields = [f for f in dataclasses.fields(self)
                  if f.name in ("start", "end", "ratio") or getattr(self, f.name) != f.default]
        return f"Route({', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in fields)})"


def default_route(depth: int, ratio: float = 0.5) -> Route:
    """The published placement: blocks ``2 .. depth - 4`` (DiT-S/B 2->8, L 2->20, XL 2->24)."""
    return Route(2, depth - 4, ratio)


ROUTE_FIELDS = tuple(f.name for f in dataclasses.fields(Route))


def parse_routes(spec: Iterable[Route | Mapping | Sequence] | None) -> tuple[Route, ...]:
    """Routes from a config value: Route objects, dicts with start/end and optional ratio, group,
    rejoin, path_drop, or tuples ``(start, end[, ratio])``."""
    routes = []
    for item in spec or ():
        if isinstance(item, Route):
            routes.append(item)
        elif isinstance(item, Mapping):
            unknown = sorted(set(item) - set(ROUTE_FIELDS))
            if unknown:
                raise ValueError(f"unknown route fields {unknown}; known: {list(ROUTE_FIELDS)}")
            routes.append(Route(int(item["start"]), int(item["end"]), float(item.get("ratio", 0.5)),
                                int(item.get("group", 0)), str(item.get("rejoin", "tread")),
                                float(item.get("path_drop", 0.0))))
        else:
            if len(item) > 3:
                raise ValueError(f"route {tuple(item)}: tuples are (start, end[, ratio]); use a dict for more")
            routes.append(Route(int(item[0]), int(item[1]), *(float(v) for v in item[2:])))
    return tuple(routes)


def kept_per_group(route: Route) -> int:
    """Tokens each ``group x group`` cell keeps; ValueError unless ``group^2 * ratio`` is whole."""
    cells = route.group * route.group
    routed = cells * route.ratio
    if abs(routed - round(routed)) > 1e-9:
        raise ValueError(f"route {route}: a {route.group}x{route.group} group cannot route the fraction "
                         f"{route.ratio} (group^2 * ratio = {routed:g} is not a whole number)")
    return cells - round(routed)


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
        if r.group < 0:
            raise ValueError(f"route {r}: group must be 0 (uniform random subset) or a group side > 0")
        if r.group:
            kept_per_group(r)
        if r.rejoin not in REJOINS:
            raise ValueError(f"route {r}: rejoin must be one of {REJOINS}")
        if not 0.0 <= r.path_drop < 1.0 or (r.path_drop and r.rejoin != "sprint"):
            raise ValueError(f"route {r}: path_drop is a probability in [0, 1), for SPRINT routes only")
    for prev, nxt in zip(routes, routes[1:]):
        if nxt.start <= prev.end:
            raise ValueError(f"routes {prev} and {nxt} overlap or are not sorted by start")
    if sum(r.rejoin == "sprint" for r in routes) > 1:
        raise ValueError(f"routes {routes}: at most one SPRINT route (the backbone owns one fusion layer)")
    return routes


def sprint_span(routes: Sequence[Route]) -> tuple[int, int] | None:
    """Blocks ``(start, end)`` of the SPRINT route among ``routes``: the model's fused span."""
    spans = [(r.start, r.end) for r in routes if r.rejoin == "sprint"]
    return spans[0] if spans else None


def token_grid(num_tokens: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    """``grid`` checked against ``num_tokens``, or the square grid of ``num_tokens``."""
    if grid is None:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"{num_tokens} tokens are not a square grid: pass the token grid")
        grid = (side, side)
    if grid[0] * grid[1] != num_tokens:
        raise ValueError(f"token grid {grid} does not hold {num_tokens} tokens")
    return tuple(grid)


def num_kept(num_tokens: int, ratio: float) -> int:
    """Tokens that a route keeps: ``N - floor(N * ratio)``, a static count under jit."""
    return num_tokens - math.floor(num_tokens * ratio)


def active_routes(routes: Sequence[Route], num_tokens: int) -> tuple[Route, ...]:
    """Routes that drop at least one token (or a SPRINT route's whole path, in training); the
    others are exactly the dense computation."""
    return tuple(r for r in routes if num_kept(num_tokens, r.ratio) < num_tokens or r.path_drop > 0)


def select_tokens(
    key: jax.Array, batch_size: int, num_tokens: int, ratio: float, *, keep_order: bool = False
) -> jax.Array:
    """Per-sample uniform random subset: int32 ``[B, K]`` token indices to keep.

    With ``keep_order`` the indices are ascending, for models whose scan order matters.
    """
    noise = jax.random.uniform(key, (batch_size, num_tokens))
    kept = jnp.argsort(noise, axis=-1)[:, : num_kept(num_tokens, ratio)].astype(jnp.int32)
    return jnp.sort(kept, axis=-1) if keep_order else kept


def select_group_tokens(
    key: jax.Array, batch_size: int, grid: tuple[int, int], group: int, ratio: float, *, keep_order: bool = False
) -> jax.Array:
    """SPRINT's structured mask: int32 ``[B, K]`` raster indices into a ``grid`` of tokens.

    Each ``group x group`` cell keeps ``kept_per_group`` tokens at positions drawn uniformly and
    independently per cell and sample (the published ``get_structured_mask_with_random_offset``:
    top-k of uniform noise per cell). Indices come cell by cell, ascending with ``keep_order``.
    """
    height, width = grid
    if height % group or width % group:
        raise ValueError(f"a {group}x{group} group does not tile the {height}x{width} token grid")
    per_cell = kept_per_group(Route(0, 0, ratio, group))
    cells_h, cells_w = height // group, width // group
    noise = jax.random.uniform(key, (batch_size, cells_h, cells_w, group * group))
    local = jnp.argsort(noise, axis=-1)[..., :per_cell]
    rows = jnp.arange(cells_h)[:, None, None] * group + local // group
    cols = jnp.arange(cells_w)[None, :, None] * group + local % group
    kept = (rows * width + cols).reshape(batch_size, -1).astype(jnp.int32)
    return jnp.sort(kept, axis=-1) if keep_order else kept


def gather_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x[b, idx[b]]`` for every sample: ``[B, N, D], [B, K] -> [B, K, D]``."""
    return jnp.take_along_axis(x, idx[..., None], axis=1)


def scatter_tokens(full: jax.Array, kept: jax.Array, idx: jax.Array) -> jax.Array:
    """Writes ``kept[b]`` into ``full[b, idx[b]]``; the other tokens keep ``full``'s values."""
    batch = jnp.arange(full.shape[0])[:, None]
    return full.at[batch, idx].set(kept.astype(full.dtype), unique_indices=True)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["kept", "dropped"],
    meta_fields=["routes", "num_tokens", "keep_order", "skip_fused"],
)
@dataclasses.dataclass(frozen=True)
class RoutePlan:
    """The token selection of one routed forward pass: a pytree that passes through jit.

    ``routes`` (static) are the active routes, in order; ``kept`` holds one int32 ``[B, K_r]``
    array per route, the positions of the tokens that its blocks see (ascending with
    ``keep_order``). The version-1 loss reads ``kept``: the selection the model used.
    ``dropped``: per route, None or bool ``[B]``, the samples whose SPRINT path is dropped in
    training (``Route.path_drop``). ``skip_fused`` (static): the model's SPRINT span is not run
    and every position takes the mask token (path-drop guidance's weak branch).
    """

    routes: tuple[Route, ...]
    kept: tuple[jax.Array, ...]
    num_tokens: int
    keep_order: bool = False
    dropped: tuple[jax.Array | None, ...] = ()
    skip_fused: bool = False


def draw_plan(
    key: jax.Array,
    routes: Sequence[Route],
    *,
    batch_size: int,
    num_tokens: int,
    keep_order: bool = False,
    grid: tuple[int, int] | None = None,
) -> RoutePlan:
    """Draws each sample's kept tokens for ``routes``; routes that drop no token are left out.

    Route ``i`` of the active ones draws its tokens from ``fold_in(key, i)`` and its path drops
    from ``fold_in(fold_in(key, i), 1)``. With ``keep_order`` (models whose blocks scan the
    tokens in order) the kept indices are ascending. Structured routes need the token ``grid``
    (default: square). Routes are checked against the model's depth where the plan is used.
    """
    active = active_routes(routes, num_tokens)
    kept, dropped = [], []
    for i, r in enumerate(active):
        route_key = jax.random.fold_in(key, i)
        if r.group:
            kept.append(select_group_tokens(route_key, batch_size, token_grid(num_tokens, grid), r.group, r.ratio,
                                            keep_order=keep_order))
        else:
            kept.append(select_tokens(route_key, batch_size, num_tokens, r.ratio, keep_order=keep_order))
        drop = None
        if r.path_drop:
            drop = jax.random.bernoulli(jax.random.fold_in(route_key, 1), r.path_drop, (batch_size,))
        dropped.append(drop)
    return RoutePlan(active, tuple(kept), num_tokens, keep_order, tuple(dropped))


def draw_plan_per_sample(
    keys: jax.Array,
    routes: Sequence[Route],
    *,
    num_tokens: int,
    keep_order: bool = False,
    grid: tuple[int, int] | None = None,
) -> RoutePlan:
    """``draw_plan`` with one key per sample (``keys: [B]``): sample b's tokens depend on
    ``keys[b]`` alone, so a sampler's routing does not depend on the batch it runs in."""
    one = lambda k: draw_plan(k, routes, batch_size=1, num_tokens=num_tokens, keep_order=keep_order, grid=grid)
    plan = jax.vmap(one)(keys)
    return jax.tree.map(lambda a: a[:, 0], plan)


def path_drop_plan(num_tokens: int, *, keep_order: bool = False) -> RoutePlan:
    """The plan of path-drop guidance's weak branch: the model's SPRINT span is skipped."""
    return RoutePlan((), (), num_tokens, keep_order, (), skip_fused=True)


def check_plan(
    plan: RoutePlan, *, depth: int, num_tokens: int, keep_order: bool, fused_span: tuple[int, int] | None = None
) -> None:
    """ValueError unless ``plan`` fits a model of ``depth`` blocks over ``num_tokens`` tokens
    (and, for a model whose blocks scan in order, was drawn with ``keep_order``) whose SPRINT
    span is ``fused_span`` (None: the model has none)."""
    validate_routes(plan.routes, depth)
    for route in plan.routes:
        span = (route.start, route.end)
        if route.rejoin == "sprint" and span != fused_span:
            raise ValueError(f"route {route} is a SPRINT route, the model's SPRINT span is {fused_span}")
        if route.rejoin == "tread" and fused_span and route.start <= fused_span[1] and fused_span[0] <= route.end:
            raise ValueError(f"TREAD route {route} overlaps the model's SPRINT span {fused_span}")
    if plan.skip_fused and fused_span is None:
        raise ValueError("path-drop guidance needs a model with a SPRINT span")
    if plan.dropped and len(plan.dropped) != len(plan.routes):
        raise ValueError(f"route plan has {len(plan.dropped)} path-drop entries for {len(plan.routes)} routes")
    if plan.num_tokens != num_tokens:
        raise ValueError(f"route plan drawn for {plan.num_tokens} tokens, the model sees {num_tokens}")
    if keep_order and not plan.keep_order:
        raise ValueError("this model scans its tokens in order: draw the route plan with keep_order=True")
    for route, kept in zip(plan.routes, plan.kept, strict=True):
        count = num_kept(num_tokens, route.ratio)
        if kept.ndim != 2 or kept.shape[1] != count:
            raise ValueError(f"route {route}: kept indices {kept.shape} are not [B, {count}]")


def sprint_rejoin(
    start: jax.Array,
    out: jax.Array | None,
    kept: jax.Array | None,
    dropped: jax.Array | None,
    mask_token: jax.Array,
    fuse: Callable[[jax.Array], jax.Array],
) -> jax.Array:
    """SPRINT's rejoin: ``fuse(concat([middle, start], -1))``, ``[B, N, D]`` in ``start``'s dtype.

    ``middle`` is the span's output ``out`` scattered to the positions ``kept`` of a sequence of
    ``mask_token`` (``[D]``), the whole of ``out`` where ``kept`` is None, all mask tokens where
    ``out`` is None (the span skipped) and for the samples ``dropped`` marks. The order of the
    concatenation follows the published code (``torch.cat([x, x_clone], dim=-1)``).
    """
    mask = jnp.broadcast_to(mask_token.astype(start.dtype), start.shape)
    if out is None:
        middle = mask
    elif kept is None:
        middle = out.astype(start.dtype)
    else:
        middle = scatter_tokens(mask, out, kept)
    if dropped is not None:
        middle = jnp.where(dropped[:, None, None], mask, middle)
    return fuse(jnp.concatenate([middle, start], axis=-1)).astype(start.dtype)


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
    # SPRINT span: rejoin by fusion (``sprint_rejoin``); ``dropped`` per-sample path drops;
    # ``skip``: the blocks are not run (path-drop guidance).
    fused: bool = False
    dropped: jax.Array | None = None
    skip: bool = False

    def gather(self, x: jax.Array) -> jax.Array:
        """The tokens of the full sequence ``x: [B, N, D]`` that the blocks see, in ``dtype``."""
        return (x if self.kept is None else gather_tokens(x, self.kept)).astype(self.dtype)

    def scatter(
        self,
        x: jax.Array,
        out: jax.Array | None,
        fusion: tuple[jax.Array, Callable[[jax.Array], jax.Array]] | None = None,
    ) -> jax.Array:
        """The full sequence after the stretch, in ``x``'s dtype: ``out`` itself where the blocks
        saw every token; else the kept tokens written back into ``x`` (the sequence at the route's
        start), so the routed tokens rejoin with the values they had there. A fused (SPRINT)
        stretch rejoins by ``sprint_rejoin`` with ``fusion = (mask_token, fuse)``; ``out`` is
        None where the stretch was skipped."""
        if self.fused:
            if fusion is None:
                raise ValueError("a SPRINT stretch needs the backbone's (mask_token, fuse)")
            return sprint_rejoin(x, out, self.kept, self.dropped, *fusion)
        return out.astype(x.dtype) if self.kept is None else scatter_tokens(x, out, self.kept)


def stretches(
    plan: RoutePlan | None,
    depth: int,
    compute_dtype: jnp.dtype,
    *,
    float32_rejoin: bool = True,
    fused_span: tuple[int, int] | None = None,
) -> list[Stretch]:
    """The forward pass over blocks ``0..depth-1`` as stretches, in order.

    A backbone runs ``x = s.scatter(x, blocks(s.blocks, s.gather(x)))`` for each (``out=None``
    for a ``skip`` stretch). With ``float32_rejoin`` (the published code's choice) the block
    right after a TREAD route computes in float32 when ``compute_dtype`` is lower: it is a
    stretch of its own. ``plan=None`` is dense. ``fused_span``: the model's SPRINT span, one
    fused stretch whether or not the plan routes it (dense: all tokens, then the fusion).
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

    entries = []
    if plan is not None:
        entries = list(zip(plan.routes, plan.kept, plan.dropped or (None,) * len(plan.routes)))
    if fused_span is not None and not any((r.start, r.end) == fused_span for r, _, _ in entries):
        entries.append((Route(*fused_span, 0.0, rejoin="sprint"), None, None))
        entries.sort(key=lambda entry: entry[0].start)
    skip = plan is not None and plan.skip_fused
    start, after_route = 0, False
    for route, kept, dropped in entries:
        add(start, route.start, None, after_route)
        if route.rejoin == "sprint":
            # One stretch: the fusion needs the sequence at the span's start untouched.
            out.append(Stretch(range(route.start, route.end + 1), kept, compute_dtype, True, dropped, skip))
            start, after_route = route.end + 1, False
            continue
        # A route that starts right after another: its first block is the one that rejoins (a
        # stretch of its own, which gathers again the tokens just scattered: the same values).
        add(route.start, route.end + 1, kept, after_route and start == route.start)
        start, after_route = route.end + 1, True
    add(start, depth, None, after_route)
    return out
