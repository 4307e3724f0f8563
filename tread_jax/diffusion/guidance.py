"""Guidance at sampling time (classifier-free, interval, sparse, path-drop) and label dropout for training.

Guidance acts on the raw network output F. The objectives are affine in F at a fixed input
(EDM: D = c_skip x + c_out F; flow: the velocity is F itself; DDPM: x0 is affine in its epsilon
channels), so ``F_u + s (F_c - F_u)`` equals guiding the denoiser, the velocity or x0, and one
wrapper serves every objective (DDPM's variance channels are left unguided, ``guided_channels``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from tread_jax import routing
from tread_jax.routing import Route

# net(x_in, noise_labels f32[B], class_labels i32[B]) -> raw output, routing bound by the caller.
RawNet = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Guidance:
    """How a sampler guides the network: ``base + scale (strong - base)``.

    scale: s; 1 means no guidance (only the strong branch: the conditional pass, routed at
        ``sparsity[1]`` under sparse guidance).
    interval: (lo, hi), guide only while the objective's noise level (sigma for EDM, t for flow)
        lies in [lo, hi]; elsewhere the strong branch alone is used. None guides every step.
    null_class: classifier-free guidance; the base branch is the same net with this label
        (the models use ``num_classes`` as "no class").
    weak_net: the base branch is this callable, class-conditional like the strong branch, which
        is the ``net`` given to the sampler.
    sparsity: Sparse Guidance (Krause et al., arXiv 2601.01608): ``(weak, strong)`` routed
        fractions over ``routes`` (their ratios replaced); both branches are the same network
        with the true labels (the published ``rf.py`` ``sample_tread`` passes label-drop 1.0 to
        both, making them unconditional; the paper's definition is followed here). Strong 0 is
        the dense pass. Each evaluation draws sample b's tokens from ``fold_in(keys[b], e)``
        (``e`` the evaluation's index), shared by the two branches, so equal sparsities give
        exactly the conditional pass and the strong branch's tokens include the weak one's.
    path_drop: SPRINT's path-drop guidance (Park et al., arXiv 2510.21986): with ``null_class``,
        the base branch is the null-class pass with the model's SPRINT span skipped, as in the
        published sampler (``path_drop_guidance=True`` there keeps the null label).
    token_grid, keep_order: the model's token grid and scan-order flag, for sparsity/path_drop.
    """

    scale: float = 1.0
    interval: tuple[float, float] | None = None
    null_class: int | None = None
    weak_net: RawNet | None = None
    sparsity: tuple[float, float] | None = None
    routes: tuple[Route, ...] = ()
    path_drop: bool = False
    token_grid: tuple[int, int] | None = None
    keep_order: bool = False

    def __post_init__(self):
        bases = sum(v is not None for v in (self.null_class, self.weak_net, self.sparsity))
        if bases > 1:
            raise ValueError("Guidance takes one base branch (null_class, weak_net or sparsity), not both")
        if self.scale != 1.0 and not bases:
            raise ValueError(f"Guidance scale {self.scale} needs null_class (classifier-free), weak_net or "
                             "sparsity (sparse)")
        if self.null_class is not None and self.null_class < 0:
            raise ValueError(f"Guidance null_class must be >= 0, got {self.null_class}")
        if self.sparsity is not None:
            weak, strong = (float(v) for v in self.sparsity)
            if not 0.0 <= strong <= weak < 1.0:
                raise ValueError(f"Guidance sparsity (weak, strong) needs 0 <= strong <= weak < 1, got {self.sparsity}")
            if not self.routes:
                raise ValueError("sparse guidance needs the routes it routes over")
            object.__setattr__(self, "sparsity", (weak, strong))
            object.__setattr__(self, "routes", tuple(self.routes))
            for route in self.routes_at(weak) + self.routes_at(strong):
                if route.group:  # a structured route routes whole numbers of tokens per group
                    routing.kept_per_group(route)
        if self.path_drop and self.null_class is None:
            raise ValueError("path-drop guidance needs null_class (its base branch is the null class)")
        if (self.sparsity is not None or self.path_drop) and self.token_grid is None:
            raise ValueError("sparse and path-drop guidance need the model's token_grid")
        if self.token_grid is not None:
            object.__setattr__(self, "token_grid", tuple(int(v) for v in self.token_grid))
        if self.interval is not None:
            if len(self.interval) != 2 or not 0 <= self.interval[0] <= self.interval[1]:
                raise ValueError(f"Guidance interval must be (lo, hi) with 0 <= lo <= hi, got {self.interval}")
            # A tuple of floats, so a Guidance built from a config list stays hashable (jit-static).
            object.__setattr__(self, "interval", tuple(float(v) for v in self.interval))

    def routes_at(self, ratio: float) -> tuple[Route, ...]:
        """``routes`` with every ratio set to ``ratio`` and no path drops: one branch's routing."""
        return tuple(dataclasses.replace(r, ratio=ratio, path_drop=0.0) for r in self.routes)


def _as_f32(net: RawNet) -> RawNet:
    return lambda x, n, y: net(x, n, y).astype(jnp.float32)


# at(level, evaluation) -> the raw net to call at that noise level for that network evaluation.
GuidedNet = Callable[[jax.Array, jax.Array | int], RawNet]


def guided_net(
    net: RawNet, guidance: Guidance | None, guided_channels: int | None = None, keys: jax.Array | None = None
) -> GuidedNet:
    """``at(level, evaluation) -> raw net`` to call at noise level ``level`` (a scalar shared by
    the batch) for network evaluation number ``evaluation`` of the sampler (an int, traced or not).

    ``guided_channels``: guide only the first k output channels (last axis) and take the rest from
    the strong pass; DDPM guides its epsilon channels, not its variance channels. ``keys``: one
    key per sample, for sparse guidance's token draws (routing then passes ``route_plan=`` to
    ``net``, which must be a backbone).

    Whether guidance runs at all is decided here in Python: with no guidance or scale 1 the
    sampler compiles only the strong pass. Classifier-free guidance concatenates the
    conditional and null-class inputs into one doubled batch (one network call) and splits the
    output. Sparse and path-drop guidance call the two branches separately (they route differently).

    Interval: the level is one scalar for the whole batch, so ``lax.cond`` really skips the
    guided branch outside the interval (a select would run both every step and throw one away);
    under jit with a batch-sharded input the scalar predicate is replicated and each device
    takes the same branch. (Under vmap, lax.cond becomes a select; the samplers do not vmap.)
    """
    cond_net = _as_f32(net)
    sparse = guidance is not None and guidance.sparsity is not None
    if sparse and keys is None:
        raise ValueError("sparse guidance needs one key per sample (the sampler's keys argument)")

    def routed(ratio: float, evaluation: jax.Array | int) -> RawNet:
        """The net with ``ratio`` of the tokens routed over the guidance routes, for one evaluation."""
        if ratio == 0.0:
            return cond_net
        grid = guidance.token_grid
        eval_keys = jax.vmap(lambda k: jax.random.fold_in(k, evaluation))(keys)
        plan = routing.draw_plan_per_sample(eval_keys, guidance.routes_at(ratio), num_tokens=grid[0] * grid[1],
                                            keep_order=guidance.keep_order, grid=grid)
        return lambda x, n, y: net(x, n, y, route_plan=plan).astype(jnp.float32)

    def strong(evaluation: jax.Array | int) -> RawNet:
        return routed(guidance.sparsity[1], evaluation) if sparse else cond_net

    if guidance is None or guidance.scale == 1.0:
        return lambda level, evaluation=0: strong(evaluation)
    scale = guidance.scale

    def mix(strong_out: jax.Array, base: jax.Array) -> jax.Array:
        guided = base + scale * (strong_out - base)
        if guided_channels is None:
            return guided
        return jnp.concatenate([guided[..., :guided_channels], strong_out[..., guided_channels:]], axis=-1)

    def combined(evaluation: jax.Array | int) -> RawNet:
        if sparse:
            weak_net, strong_net = routed(guidance.sparsity[0], evaluation), strong(evaluation)
            return lambda x, n, y: mix(strong_net(x, n, y), weak_net(x, n, y))
        if guidance.weak_net is not None:
            weak = _as_f32(guidance.weak_net)
            return lambda x, n, y: mix(cond_net(x, n, y), weak(x, n, y))
        null_class = guidance.null_class
        if guidance.path_drop:
            grid = guidance.token_grid
            skip = routing.path_drop_plan(grid[0] * grid[1], keep_order=guidance.keep_order)
            return lambda x, n, y: mix(cond_net(x, n, y), net(x, n, jnp.full_like(y, null_class),
                                                              route_plan=skip).astype(jnp.float32))

        def cfg(x: jax.Array, noise_labels: jax.Array, class_labels: jax.Array) -> jax.Array:
            batch = x.shape[0]
            out = cond_net(
                jnp.concatenate([x, x]),
                jnp.concatenate([noise_labels, noise_labels]),
                jnp.concatenate([class_labels, jnp.full_like(class_labels, null_class)]),
            )
            return mix(out[:batch], out[batch:])

        return cfg

    if guidance.interval is None:
        return lambda level, evaluation=0: combined(evaluation)
    lo, hi = guidance.interval

    def at(level: jax.Array, evaluation: jax.Array | int = 0) -> RawNet:
        inside = (level >= lo) & (level <= hi)
        guided, plain = combined(evaluation), strong(evaluation)
        return lambda x, n, y: jax.lax.cond(inside, guided, plain, x, n, y)

    return at


def check_sample_inputs(noise: jax.Array, class_labels: jax.Array, num_steps: int, minimum: int) -> None:
    """ValueError for inputs a sampler cannot use, raised before tracing."""
    if noise.ndim != 4:
        raise ValueError(f"noise must be [B, H, W, C], got shape {noise.shape}")
    if class_labels.shape != noise.shape[:1]:
        raise ValueError(f"class_labels must be [B] = [{noise.shape[0]}], got shape {class_labels.shape}")
    if not isinstance(num_steps, int) or num_steps < minimum:
        raise ValueError(f"num_steps must be an integer >= {minimum}, got {num_steps!r}")


def drop_labels(key: jax.Array, labels: jax.Array, prob: float, null_class: int) -> jax.Array:
    """Replace each label by ``null_class`` with probability ``prob`` (CFG training; published default 0.1, docs/method.md).

    Pure and elementwise over the batch, so it follows the labels' sharding.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"label drop probability must be in [0, 1], got {prob}")
    drop = jax.random.bernoulli(key, prob, labels.shape)
    return jnp.where(drop, jnp.asarray(null_class, labels.dtype), labels)
