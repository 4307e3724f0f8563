"""A tiny DiT overfits one fixed batch under the EDM loss: dense, with a TREAD route (random or
structured selection) and with a SPRINT route (mask token + fusion).

The loss uses one fixed key, so the noise levels and the noise are the same every step and
the loss can fall towards zero; the routing key changes every step, as in training, so the
routed model must fit the batch whatever subset of tokens skips the route.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tread_jax import diffusion, routing
from tread_jax.models import create_model
from tread_jax.routing import Route

STEPS = 80


def _build(sprint_span: tuple[int, int] | None = None) -> nnx.Module:
    return create_model(
        "DiT-S/2",
        input_size=8,
        in_channels=2,
        num_classes=4,
        depth=3,
        hidden_size=32,
        num_heads=2,
        sprint_span=sprint_span,
        rngs=nnx.Rngs(0),
    )


@pytest.mark.parametrize(
    "routes",
    [(), (Route(1, 1, 0.5),), (Route(1, 1, 0.75, group=2),), (Route(1, 1, 0.75, group=2, rejoin="sprint"),)],
    ids=["dense", "routed", "structured", "sprint"],
)
def test_tiny_dit_overfits_one_batch(routes):
    build = lambda: _build(routing.sprint_span(routes))
    graphdef, _ = nnx.split(nnx.eval_shape(build), nnx.Param)
    # DiT's real initialisation, compiled once rather than dispatched op by op.
    params = jax.jit(lambda: nnx.split(build(), nnx.Param)[1])()
    objective = diffusion.create_objective(diffusion.default_config("edm"))
    tx = optax.adam(2e-3)

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (8, 8, 8, 2)), jnp.float32)
    labels = jnp.asarray(np.arange(8) % 4)
    loss_key = jax.random.key(1)

    def loss_fn(params, route_key):
        model = nnx.merge(graphdef, params)
        plan = routing.draw_plan(route_key, routes, batch_size=8, num_tokens=model.num_tokens(8, 8))

        def net(x, noise_labels, class_labels):
            return model(x, noise_labels, class_labels, route_plan=plan)

        return objective.loss(net, images, labels, loss_key).mean()

    @jax.jit
    def train(params):
        def step(carry, route_key):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, route_key)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        route_keys = jax.random.split(jax.random.key(2), STEPS)
        _, losses = jax.lax.scan(step, (params, tx.init(params)), route_keys)
        return losses

    # The run is tiny; XLA's backend optimisations would cost more compile time than they save.
    compiled = train.lower(params).compile({"xla_backend_optimization_level": 0})
    losses = np.asarray(compiled(params))
    assert np.isfinite(losses).all()
    first, last = losses[0], losses[-10:].mean()
    assert last < 0.1 * first, f"loss {first:.4f} -> {last:.4f}"
