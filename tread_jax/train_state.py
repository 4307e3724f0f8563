"""Train state and the optimizer: float32 parameters, AdamW state, EMA copy, step counter.

The model is kept as an NNX graph definition (static, outside the state) plus pytrees of
arrays, so the step can be a plain ``jax.jit`` function over the state with explicit
shardings and buffer donation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct


@struct.dataclass
class TrainState:
    """Everything a checkpoint must hold to continue training bit for bit."""

    step: jax.Array  # int32 scalar: number of optimizer updates applied so far
    params: Any  # nested dict of float32 parameter arrays (nnx.to_pure_dict layout)
    opt_state: Any
    ema_params: Any  # same structure as params


def learning_rate_schedule(optim: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 over ``warmup_steps``, then constant (the published default,
    docs/method.md) or, with ``decay_steps`` > 0, a cosine decay that reaches 0 at step
    ``decay_steps``."""
    decay_steps = optim.get("decay_steps", 0)
    if decay_steps > 0:
        if decay_steps <= optim.warmup_steps:
            raise ValueError(f"optim.decay_steps ({decay_steps}) must exceed optim.warmup_steps "
                             f"({optim.warmup_steps})")
        return optax.warmup_cosine_decay_schedule(0.0, optim.learning_rate, optim.warmup_steps,
                                                  decay_steps)
    if optim.warmup_steps > 0:
        return optax.warmup_constant_schedule(0.0, optim.learning_rate, optim.warmup_steps)
    return optax.constant_schedule(optim.learning_rate)


def create_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW from the config; global-norm clipping first when ``grad_clip > 0``."""
    adamw = optax.adamw(
        learning_rate_schedule(optim),
        b1=optim.b1,
        b2=optim.b2,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
    )
    if optim.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw)
    return adamw


def init_train_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    """A fresh state at step 0; the EMA starts as a copy of the initial parameters."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        # A real copy: params and EMA must be separate buffers because the step donates both.
        ema_params=jax.tree.map(jnp.copy, params),
    )


def is_finite(state: Any) -> jax.Array:
    """True (a boolean scalar) when every floating-point leaf of ``state`` is finite.

    The loop checks a state before saving it: a finite loss and gradient can still overflow the
    update (a huge learning rate), and such a state must never become a checkpoint.
    """
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """``ema <- decay * ema + (1 - decay) * params``, leaf by leaf."""
    return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)
