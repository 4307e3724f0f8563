"""The pure train step: label dropout, (routed) denoising loss, AdamW update, EMA update, metrics.

Randomness comes from ``fold_in(key(seed), step)``, a function of the saved step alone, so a
resumed run draws exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics as clu_metrics

from tread_jax import diffusion, routing, sharding, train_state
from tread_jax.data import latents
from tread_jax.diffusion import repa
from tread_jax.logging_utils import TrainMetrics
from tread_jax.model_builder import ModelBuilder

TrainStep = Callable[[train_state.TrainState, dict[str, jax.Array]], tuple[train_state.TrainState, TrainMetrics]]
TrainCall = Callable[[train_state.TrainState, dict[str, jax.Array], TrainMetrics],
                     tuple[train_state.TrainState, TrainMetrics]]


# The batch entry holding the clean images REPA's encoder sees (uint8 RGB, NHWC).
REPA_IMAGE_KEY = latents.IMAGE_FEATURE
# ``encoder(weights, images)``: features ``[B, tokens, D]`` of clean images ``[B, H, W, 3]`` in
# [-1, 1] (``repa.load_encoder``); the weights are an argument of the step, not constants in it.
Encoder = Callable[[Any, jax.Array], jax.Array]


# ``TrainMetrics`` plus REPA's alignment loss (``loss`` stays the denoising loss alone). Built by
# ``create``: a clu Collection reads its metrics from its own class annotations only.
RepaTrainMetrics = clu_metrics.Collection.create(
    **TrainMetrics.__annotations__, alignment_loss=clu_metrics.Average.from_output("alignment_loss"))


def metrics_type(config: ml_collections.ConfigDict) -> type[clu_metrics.Collection]:
    """What the train step of ``config`` reports."""
    return RepaTrainMetrics if repa.active_config(config) is not None else TrainMetrics


def model_input(config: ml_collections.ConfigDict, batch: dict[str, jax.Array], key: jax.Array) -> jax.Array:
    """The clean training image of a batch.

    Latent batches carry the VAE posterior (``image`` = scaled mean, ``image_std``); each step
    trains on a fresh posterior sample unless ``config.data.sample_latents`` is False (then on
    the stored mean). Pixel batches pass through.
    """
    if not config.data.get("sample_latents", True):
        return batch["image"]
    return latents.sample_latents(batch, key)


def gradient_norm(grads: Any) -> jax.Array:
    """The global L2 norm of ``grads`` (``optax.global_norm``'s value), as a sum of ``|g| * |g|``.

    Written with ``g * g``, XLA shares that product with AdamW's second moment and makes it a
    kernel of its own, one more pass over every gradient (about 1.5% of the digits step on CPU;
    benchmarks/README.md, "The update in place").
    """
    return jnp.sqrt(sum(jnp.sum(jnp.abs(g) * jnp.abs(g)) for g in jax.tree.leaves(grads)))


def after(tree: Any, scalar: jax.Array) -> Any:
    """``tree`` tied to ``scalar`` by a data dependency: ``x + 0 * scalar`` for each leaf, the same
    values while ``scalar`` is finite (NaN otherwise).

    The train step writes the new parameters from the parameters tied to the gradient norm, which
    orders the update after the whole backward pass and lets XLA write the new parameters into
    the donated buffers of the old ones. Without it, no data dependency orders a parameter's
    reads in the backward pass (``dx = dy @ W.T``, every kernel but the first layer's) before its
    update, and XLA's copy insertion copies the parameter first: 53 copies per digits step, about
    4% of its thread time on CPU, and 150 MB more temporary memory for a routed DiT-XL/2 step at
    batch 8 on CPU (benchmarks/README.md, "The update in place"). An ``optimization_barrier``
    does not help: the CPU backend removes it before copy insertion.
    Tying the parameters rather than the gradients leaves the optimizer's arithmetic as it was
    (tied gradients change how XLA fuses the moment updates, and the last bits of the result).
    """
    return jax.tree.map(lambda x: x + 0 * scalar.astype(x.dtype), tree)


def kept_token_loss(per_element: jax.Array, plan: routing.RoutePlan, patch_size: int, mae_coef: float) -> jax.Array:
    """The version-1 loss (docs/method.md) over the tokens the model kept: ``plan`` is the route
    plan the forward pass used."""
    return diffusion.routed_loss(diffusion.token_loss(per_element, patch_size), plan.kept, mae_coef)


def make_train_step(
    config: ml_collections.ConfigDict,
    model: ModelBuilder,
    objective: diffusion.Objective,
    tx: optax.GradientTransformation,
    routes: tuple[routing.Route, ...],
    encoder: Encoder | None = None,
) -> TrainStep:
    """``step(state, batch) -> (state, metrics)``, pure, for ``jax.jit``.

    The metrics record the first step whose loss or gradient is not finite; the loop checks the
    state itself before saving it (``train_state.is_finite``).

    With ``config.repa.enabled`` the loss adds REPA's alignment of the model's projected tokens
    after block ``config.repa.depth`` (the kept ones under routing, at their original
    positions) with ``encoder``'s features of the batch's clean images (``REPA_IMAGE_KEY``),
    computed without gradient; the step then takes the encoder's weights as a third argument.
    """
    base_key = jax.random.key(config.seed)
    schedule = train_state.learning_rate_schedule(config.optim)
    route_loss = config.route_loss
    repa_config = model.repa
    if repa_config is not None and encoder is None:
        raise ValueError("config.repa is enabled: the train step needs the REPA encoder")
    metrics_cls = metrics_type(config)

    def step_fn(state: train_state.TrainState, batch: dict[str, jax.Array], encoder_weights: Any = None):
        key = jax.random.fold_in(base_key, state.step)
        label_key, loss_key, route_key = jax.random.split(key, 3)
        labels = diffusion.drop_labels(label_key, batch["label"], config.label_dropout, model.num_classes)
        # A fourth stream folded in (not split) so the three above draw what they always drew.
        x = model_input(config, batch, jax.random.fold_in(key, 3))

        # One draw of the kept tokens, seen by the forward pass and by the version-1 loss alike.
        plan = routing.draw_plan(route_key, routes, batch_size=x.shape[0],
                                 num_tokens=model.abstract_model.num_tokens(*x.shape[1:3]),
                                 keep_order=model.abstract_model.keep_order)

        features = None
        if repa_config is not None:
            if REPA_IMAGE_KEY not in batch:
                raise ValueError(f"config.repa is enabled but the batch has no {REPA_IMAGE_KEY!r} (clean images)")
            features = encoder(encoder_weights, repa.images_from_uint8(batch[REPA_IMAGE_KEY]))
            if features.shape[1] != plan.num_tokens:
                raise ValueError(f"the REPA encoder gives {features.shape[1]} tokens per image, the model "
                                 f"{plan.num_tokens}: their grids must match (encoder_image_size)")

        def loss_fn(params: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
            """The loss to differentiate, and the losses to report."""
            network = model.bind(params)
            hooked = []  # the REPA tokens of the (one) forward pass

            def net(x: jax.Array, noise_labels: jax.Array, class_labels: jax.Array) -> jax.Array:
                if repa_config is None:
                    return network(x, noise_labels, class_labels, route_plan=plan)
                out, tokens = network(x, noise_labels, class_labels, route_plan=plan, repa_depth=repa_config.depth)
                hooked.append(tokens)
                return out

            per_element = objective.loss(net, x, labels, loss_key)
            if not route_loss.enabled:
                loss = per_element.mean()
            else:
                loss = kept_token_loss(per_element, plan, model.patch_size, route_loss.mae_coef)
            if repa_config is None:
                return loss, {"loss": loss}
            if len(hooked) != 1:
                raise ValueError(f"REPA needs one forward pass per step, the objective ran {len(hooked)}")
            alignment = repa.alignment_loss(network.repa_projector(hooked[0]), features,
                                            repa.aligned_positions(plan, repa_config.depth), coef=repa_config.coef)
            return loss + alignment, {"loss": loss, "alignment_loss": alignment}

        # ``losses``: what the metrics report (the denoising loss, and REPA's alignment loss).
        (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = gradient_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(after(state.params, grad_norm), updates)  # in place: see ``after``
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema_params=train_state.ema_update(state.ema_params, params, config.ema_decay),
        )
        step_metrics = metrics_cls.single_from_model_output(
            **losses,
            grad_norm=grad_norm,
            learning_rate=schedule(state.step),
            step=state.step + 1,
        )
        return new_state, step_metrics

    return step_fn


def make_train_call(step_fn: TrainStep, steps_per_call: int) -> TrainCall:
    """``call(state, batches, metrics[, encoder_weights]) -> (state, metrics)``: ``steps_per_call``
    steps per call, their metrics merged into ``metrics`` on the devices (the loop fetches them
    only to log).

    With one step per call ``batches`` is one batch; with K it is K batches stacked on a leading
    axis, run by ``lax.scan``. Each step draws its randomness from its own step number, so K
    steps in one call compute what K calls of one step compute.
    """

    def call(state: train_state.TrainState, batches: dict[str, jax.Array], metrics: TrainMetrics,
             *encoder_weights: Any):
        def accumulate(carry: tuple[train_state.TrainState, TrainMetrics], batch: dict[str, jax.Array]):
            state, metrics = carry
            state, step_metrics = step_fn(state, batch, *encoder_weights)
            merged = metrics.merge(step_metrics)
            # The carry keeps its dtypes (a weakly typed learning rate would change the scan's carry).
            return (state, jax.tree.map(lambda new, old: new.astype(old.dtype), merged, metrics)), None

        if steps_per_call == 1:
            return accumulate((state, metrics), batches)[0]
        return jax.lax.scan(accumulate, (state, metrics), batches, length=steps_per_call)[0]

    return call


class BoundCall:
    """A jitted call with trailing arguments bound (REPA's encoder weights: passed as arguments,
    since closed over they would be embedded in the program as constants), which still lowers
    and compiles like the jitted function (``runtime.compile_everywhere``)."""

    def __init__(self, fn: Any, *bound: Any):
        self.fn, self.bound = fn, bound

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args, *self.bound)

    def __getattr__(self, name: str) -> Any:
        # What else the jitted or compiled function offers (``memory_analysis``, ...) reads through.
        if name in ("fn", "bound"):  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.fn, name)

    def lower(self, *args: Any) -> Any:
        lowered = self.fn.lower(*args, *self.bound)
        return _BoundLowered(lowered, self.bound)


@dataclasses.dataclass(frozen=True)
class _BoundLowered:
    lowered: Any
    bound: tuple

    def compile(self) -> BoundCall:
        return BoundCall(self.lowered.compile(), *self.bound)


def jit_train_call(config: ml_collections.ConfigDict, model: ModelBuilder, objective: diffusion.Objective,
                   tx: optax.GradientTransformation, routes: tuple[routing.Route, ...], mesh: jax.sharding.Mesh,
                   state_sharding: Any) -> Any:
    """The train call as the loop runs it (``config.steps_per_call`` steps), jitted with the
    state's and the batches' shardings and with the state and the metrics donated. With REPA it
    loads the encoder (``repa.load_encoder``) and binds its replicated weights to the call."""
    per_call = config.get("steps_per_call", 1)
    encoder, weights = None, ()
    if model.repa is not None:
        encoder, encoder_weights = repa.load_encoder(model.repa)
        weights = (jax.device_put(encoder_weights, sharding.replicated(mesh)),)
    jitted = jax.jit(
        make_train_call(make_train_step(config, model, objective, tx, routes, encoder), per_call),
        in_shardings=(state_sharding, sharding.batch_sharding(mesh, stacked=per_call > 1), sharding.replicated(mesh),
                      *(sharding.replicated(mesh) for _ in weights)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0, 2),
    )
    return BoundCall(jitted, *weights) if weights else jitted
