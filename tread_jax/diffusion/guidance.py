"""Guidance at sampling time (classifier-free, interval, sparse) and label dropout for training.

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

# net(x_in, noise_labels f32[B], class_labels i32[B]) -> raw output, routing bound by the caller.
RawNet = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Guidance:
    """How a sampler guides the network.

    scale: s in ``base + s (strong - base)``; 1 means no guidance (only the conditional pass).
    interval: (lo, hi), guide only while the objective's noise level (sigma for EDM, t for flow)
        lies in [lo, hi]; elsewhere the conditional output is used. None guides every step.
    null_class: classifier-free guidance; the base branch is the same net with this label
        (the models use ``num_classes`` as "no class").
    weak_net: sparse guidance; the base branch is this callable (the same model bound to a high
        routing ratio), class-conditional like the strong branch, which is the ``net`` given to
        the sampler.
    Exactly one of null_class / weak_net is needed when scale != 1.
    """

    scale: float = 1.0
    interval: tuple[float, float] | None = None
    null_class: int | None = None
    weak_net: RawNet | None = None

    def __post_init__(self):
        if self.null_class is not None and self.weak_net is not None:
            raise ValueError("Guidance takes null_class (classifier-free) or weak_net (sparse), not both")
        if self.scale != 1.0 and self.null_class is None and self.weak_net is None:
            raise ValueError(f"Guidance scale {self.scale} needs null_class (classifier-free) or weak_net (sparse)")
        if self.null_class is not None and self.null_class < 0:
            raise ValueError(f"Guidance null_class must be >= 0, got {self.null_class}")
        if self.interval is not None:
            if len(self.interval) != 2 or not 0 <= self.interval[0] <= self.interval[1]:
                raise ValueError(f"Guidance interval must be (lo, hi) with 0 <= lo <= hi, got {self.interval}")
            # A tuple of floats, so a Guidance built from a config list stays hashable (jit-static).
            object.__setattr__(self, "interval", tuple(float(v) for v in self.interval))


def _as_f32(net: RawNet) -> RawNet:
    return lambda x, n, y: net(x, n, y).astype(jnp.float32)


def guided_net(
    net: RawNet, guidance: Guidance | None, guided_channels: int | None = None
) -> Callable[[jax.Array], RawNet]:
    """``at(level) -> raw net`` to call at noise level ``level`` (a scalar shared by the batch).

    ``guided_channels``: guide only the first k output channels (last axis) and take the rest from
    the conditional pass; DDPM guides its epsilon channels, not its variance channels.

    Whether guidance runs at all is decided here in Python: with no guidance or scale 1 the
    sampler compiles only the conditional pass. Classifier-free guidance concatenates the
    conditional and null-class inputs into one doubled batch (one network call) and splits the
    output. Sparse guidance calls the weak and strong nets separately (they route differently).

    Interval: the level is one scalar for the whole batch, so ``lax.cond`` really skips the
    guided branch outside the interval (a select would run both every step and throw one away);
    under jit with a batch-sharded input the scalar predicate is replicated and each device
    takes the same branch. (Under vmap, lax.cond becomes a select; the samplers do not vmap.)
    """
    cond_net = _as_f32(net)
    if guidance is None or guidance.scale == 1.0:
        return lambda level: cond_net
    scale = guidance.scale

    def mix(strong: jax.Array, base: jax.Array) -> jax.Array:
        guided = base + scale * (strong - base)
        if guided_channels is None:
            return guided
        return jnp.concatenate([guided[..., :guided_channels], strong[..., guided_channels:]], axis=-1)

    if guidance.weak_net is not None:
        weak_net = _as_f32(guidance.weak_net)

        def combined(x: jax.Array, noise_labels: jax.Array, class_labels: jax.Array) -> jax.Array:
            return mix(cond_net(x, noise_labels, class_labels), weak_net(x, noise_labels, class_labels))

    else:
        null_class = guidance.null_class

        def combined(x: jax.Array, noise_labels: jax.Array, class_labels: jax.Array) -> jax.Array:
            batch = x.shape[0]
            out = cond_net(
                jnp.concatenate([x, x]),
                jnp.concatenate([noise_labels, noise_labels]),
                jnp.concatenate([class_labels, jnp.full_like(class_labels, null_class)]),
            )
            return mix(out[:batch], out[batch:])

    if guidance.interval is None:
        return lambda level: combined
    lo, hi = guidance.interval

    def at(level: jax.Array) -> RawNet:
        inside = (level >= lo) & (level <= hi)
        return lambda x, n, y: jax.lax.cond(inside, combined, cond_net, x, n, y)

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
