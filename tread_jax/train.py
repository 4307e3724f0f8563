"""The training loop: ``train_and_evaluate(config, workdir)``.

One code path for one CPU, one GPU, fake CPU devices and multi-host pods: the state lives on
a ``(data, fsdp)`` mesh, the step is a single ``jax.jit`` with explicit shardings and the
state's buffers donated, and every process feeds only its share of each global batch. The
loop syncs with the devices only at log, checkpoint and sample steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import parameter_overview
from flax import nnx

from tread_jax import checkpoint, data, diffusion, models, preflight, routing, sharding, train_state
from tread_jax.checkpoint import Checkpointer
from tread_jax.data import latents
from tread_jax.logging_utils import (
    NO_BAD_STEP,
    MetricWriter,
    Throughput,
    TrainMetrics,
    format_duration,
    progress_line,
    save_class_grids,
)


def to_host(x: jax.Array) -> np.ndarray:
    """A replicated array as numpy on this process (works when other processes hold copies too)."""
    return np.asarray(x.addressable_data(0))


def compile_everywhere(jitted: Any, *args: Any) -> Any:
    """Compiles ``jitted`` for ``args`` ahead of time, then waits for every process to finish.

    Multi-process CPU runs exchange data through gloo, whose connection setup gives up after
    30 s; without this barrier a process that compiles faster would wait in the program's
    first collective for one that is still compiling and fail. The barrier goes through the
    coordination service instead, which has no such limit.
    """
    compiled = jitted.lower(*args).compile()
    if jax.process_count() > 1:
        global _barriers
        _barriers += 1
        ocp.multihost.sync_global_processes(f"tread_jax_compiled_{_barriers}", timeout=_COMPILE_BARRIER_S)
    return compiled


_barriers = 0  # barrier names must be unique within a job
_COMPILE_BARRIER_S = 3600


def _say(message: str) -> None:
    """Console output for the person running the job: process 0 only."""
    if jax.process_index() == 0:
        print(message, flush=True)


class ModelParts:
    """The NNX model as a static graph definition plus functions of its parameter pytrees.

    Shared by the trainer, sampling, evaluation and the benchmarks so that all build the model
    from the config the same way.
    """

    def __init__(self, config: ml_collections.ConfigDict, info: data.DatasetInfo):
        height, _, channels = info.image_shape
        overrides = dict(config.model.get("overrides", {}) or {})
        self.num_classes = info.num_classes
        self.image_shape = info.image_shape
        self.seed = config.seed

        def build(rngs: nnx.Rngs) -> nnx.Module:
            return models.create_model(
                config.model.name,
                input_size=height,
                in_channels=channels,
                num_classes=info.num_classes,
                compute_dtype=jnp.dtype(config.model.compute_dtype),
                scan_blocks=config.model.get("scan_blocks", False),
                remat=config.model.get("remat", "none"),
                rngs=rngs,
                **overrides,
            )

        self.build = build
        abstract = nnx.eval_shape(lambda: build(nnx.Rngs(config.seed)))
        self.graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)
        self.patch_size = abstract.patch_size

    def init(self) -> tuple[Any, Any]:
        """Fresh parameters and the non-parameter model state (empty for DiT), as nested dicts
        of arrays: jit flattens plain dicts about 4x faster than ``nnx.State``, which the train
        step pays twice per call (measured 1.5 ms against 6.1 ms for the digits model's state)."""
        _, params, rest = nnx.split(self.build(nnx.Rngs(self.seed)), nnx.Param, ...)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

    def merge(self, params: Any, rest: Any) -> nnx.Module:
        return nnx.merge(self.graphdef, params, rest)

    def init_rest(self, mesh: jax.sharding.Mesh) -> Any:
        """The non-parameter model state, replicated on ``mesh``.

        It is not checkpointed (empty for DiT), so a restored run rebuilds it; XLA drops the
        unused parameter initialisation.
        """
        return compile_everywhere(jax.jit(lambda: self.init()[1], out_shardings=sharding.replicated(mesh)))()


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``abstract`` placed as ``shardings``: the target of a sharded restore."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


@dataclasses.dataclass(frozen=True)
class EmaWeights:
    """The EMA parameters of one checkpoint of a training workdir, sharded as in training."""

    parts: ModelParts
    mesh: jax.sharding.Mesh
    params: Any
    param_shardings: Any
    rest: Any
    step: int


def restore_ema(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> EmaWeights:
    """Restores the EMA weights of checkpoint ``step`` (default: the latest) of ``workdir``.

    For sampling and evaluation after (or during) training: the model, mesh and shardings come
    from ``config`` exactly as in ``train_and_evaluate``. FileNotFoundError without a checkpoint.
    """
    parts = ModelParts(config, data.dataset_info(config.data))
    mesh = sharding.create_mesh(config.mesh)
    abstract_params, _ = jax.eval_shape(parts.init)
    param_shardings = sharding.state_shardings(abstract_params, mesh, config.fsdp_min_size)
    params, step = checkpoint.restore_ema_params(workdir, with_shardings(abstract_params, param_shardings), step)
    return EmaWeights(parts, mesh, params, param_shardings, parts.init_rest(mesh), step)


def model_input(config: ml_collections.ConfigDict, batch: dict[str, jax.Array], key: jax.Array) -> jax.Array:
    """The clean training image of a batch.

    Latent batches carry the VAE posterior (``image`` = scaled mean, ``image_std``); each step
    trains on a fresh posterior sample unless ``config.data.sample_latents`` is False (then on
    the stored mean). Pixel batches pass through.
    """
    if not config.data.get("sample_latents", True):
        return batch["image"]
    return latents.sample_latents(batch, key)


def make_train_step(
    config: ml_collections.ConfigDict,
    parts: ModelParts,
    objective: diffusion.Objective,
    tx: optax.GradientTransformation,
    routes: tuple[routing.Route, ...],
) -> Callable[[train_state.TrainState, dict[str, jax.Array], Any], tuple[train_state.TrainState, TrainMetrics]]:
    """The pure train step: label dropout, routed loss, AdamW update, EMA update, metrics.

    Randomness comes from ``fold_in(key(seed), step)``, a function of the saved step alone,
    so a resumed run draws exactly what the uninterrupted run would have drawn.
    """
    base_key = jax.random.key(config.seed)
    schedule = train_state.learning_rate_schedule(config.optim)
    version1 = config.route_loss.enabled

    def step_fn(state: train_state.TrainState, batch: dict[str, jax.Array], rest: Any):
        key = jax.random.fold_in(base_key, state.step)
        label_key, loss_key, route_key = jax.random.split(key, 3)
        labels = diffusion.drop_labels(label_key, batch["label"], config.label_dropout, parts.num_classes)
        # A fourth stream folded in (not split) so the three above draw what they always drew.
        x = model_input(config, batch, jax.random.fold_in(key, 3))

        def loss_fn(params: Any) -> jax.Array:
            model = parts.merge(params, rest)

            def net(x: jax.Array, noise_labels: jax.Array, class_labels: jax.Array) -> jax.Array:
                return model(x, noise_labels, class_labels, routes=routes, route_key=route_key)

            per_element = objective.loss(net, x, labels, loss_key)
            if not version1:
                return per_element.mean()
            # Version-1 loss: rebuild the model's token selection from the same key (the model
            # draws from the routes that drop at least one token, in order).
            per_token = diffusion.token_loss(per_element, parts.patch_size)
            batch_size, num_tokens = per_token.shape
            active = routing.active_routes(routes, num_tokens)
            kept = routing.kept_indices(route_key, active, batch_size, num_tokens)
            return diffusion.routed_loss(per_token, kept, config.route_loss.mae_coef)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema_params=train_state.ema_update(state.ema_params, params, config.ema_decay),
        )
        step_metrics = TrainMetrics.single_from_model_output(
            loss=loss,
            grad_norm=optax.tree.norm(grads),
            learning_rate=schedule(state.step),
            step=state.step + 1,
        )
        return new_state, step_metrics

    return step_fn


def make_sample_fn(
    parts: ModelParts, objective: diffusion.Objective, mesh: jax.sharding.Mesh, *, num_steps: int, guidance: float
) -> Callable[[Any, Any, jax.Array, int], np.ndarray]:
    """``sample(ema_params, rest, labels, seed) -> samples`` (numpy, in the data's space: pixels
    or scaled latents, unclipped), dense, jitted."""
    guide = None if guidance == 1.0 else diffusion.Guidance(scale=guidance, null_class=parts.num_classes)

    def sample(params: Any, rest: Any, labels: jax.Array, seed: jax.Array) -> jax.Array:
        model = parts.merge(params, rest)
        noise = jax.random.normal(jax.random.key(seed), (labels.shape[0], *parts.image_shape))
        return objective.sample(model, noise, labels, num_steps=num_steps, guidance=guide)

    jitted = jax.jit(sample, out_shardings=sharding.replicated(mesh))
    compiled = {}  # per label count

    def run(params: Any, rest: Any, labels: np.ndarray, seed: int) -> np.ndarray:
        args = (params, rest, jnp.asarray(labels, jnp.int32), jnp.uint32(seed))
        if len(labels) not in compiled:
            compiled[len(labels)] = compile_everywhere(jitted, *args)
        return to_host(compiled[len(labels)](*args))

    return run


class _StopSignal:
    """Turns SIGTERM into a flag the loop polls, so it can save and exit cleanly.

    Only for single-process jobs: in a multi-process job jax's preemption service owns SIGTERM
    and the loop asks ``reached_preemption`` instead, so that all processes stop at one step.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _check_finite(computed: dict[str, np.ndarray], checkpointer: Checkpointer) -> None:
    """Stops on the first non-finite loss or gradient; the bad state is never saved."""
    bad_step = int(computed["first_nonfinite_step"])
    if bad_step != NO_BAD_STEP:
        checkpointer.wait()
        last = checkpointer.manager.latest_step()
        kept = f"the last good checkpoint is step {last} in {checkpointer.directory}" if last else "no checkpoint was written"
        raise FloatingPointError(f"non-finite loss or gradient at step {bad_step}; stopping ({kept})")


def _restore_init_from(source_workdir: str, abstract_state: Any) -> tuple[Any, int]:
    """The latest train state of another run (a routed run for a dense fine-tune), continuing
    at its step; the data iterator is not restored, so this run reads a fresh stream."""
    source = Checkpointer(source_workdir, read_only=True)
    try:
        restored = source.restore_latest(abstract_state)
    finally:
        source.close()
    if restored is None:  # preflight saw checkpoints, but none could be read
        raise FileNotFoundError(f"init_from {source_workdir!r} holds no usable checkpoint")
    _say(f"initialised from {source.directory} step {restored[1]}")
    return restored


def _grid_writer(data_config: ml_collections.ConfigDict, directory: str) -> Callable[..., list[str]]:
    """``save(images, labels, prefix, *, per_class_files)``: sample grids as PNG (process 0).

    Latent samples are decoded to pixels first, by the dataset's VAE, loaded at the first grid
    so that runs without grids never load it.
    """
    decoder = None

    def save(images: np.ndarray, labels: np.ndarray, prefix: str, *, per_class_files: bool) -> list[str]:
        nonlocal decoder
        if jax.process_index() != 0:
            return []
        if not data.DATASETS[data_config.name].pixel_space:
            decoder = decoder or latents.image_decoder(data_config.vae)
            images = decoder(images)
        return save_class_grids(images, labels, directory, prefix, per_class_files=per_class_files)

    return save


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from ``workdir`` when it holds checkpoints), then runs the quality report.

    Returns the final logged scalars plus, when configured, the quality report.
    """
    info = preflight.check(config, workdir)
    routes = routing.validate_routes(
        routing.parse_routes(config.routes), preflight.model_settings(config.model)["depth"]
    )
    mesh = sharding.create_mesh(config.mesh)
    objective = diffusion.create_objective(config.diffusion)
    tx = train_state.create_optimizer(config.optim)
    parts = ModelParts(config, info)
    _say(
        f"{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"mesh {dict(mesh.shape)}; model {config.model.name} {dict(config.model.get('overrides', {}) or {})}, "
        f"routes {list(routes)}; dataset {info.name} {info.image_shape} x {info.num_train}"
    )

    def init() -> tuple[train_state.TrainState, Any]:
        params, rest = parts.init()
        return train_state.init_train_state(params, tx), rest

    abstract_state, abstract_rest = jax.eval_shape(init)
    state_sharding = sharding.state_shardings(abstract_state, mesh, config.fsdp_min_size)
    rest_sharding = sharding.replicated(mesh)
    init_jit = compile_everywhere(jax.jit(init, out_shardings=(state_sharding, rest_sharding)))

    data_iterator = data.create_train_iterator(
        config.data,
        global_batch_size=config.global_batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    checkpointer = Checkpointer(
        workdir, save_interval_steps=config.checkpoint_every, max_to_keep=config.max_to_keep
    )
    abstract_sharded = with_shardings(abstract_state, state_sharding)
    restored = checkpointer.restore_latest(abstract_sharded, data_iterator)
    if restored is not None:
        _say(f"resumed from checkpoint step {restored[1]}")
    elif config.get("init_from", ""):
        restored = _restore_init_from(config.init_from, abstract_sharded)
    if restored is None:
        state, rest = init_jit()
        _say("starting from scratch")
    else:
        state, _ = restored
        rest = parts.init_rest(mesh)
    start_step = int(to_host(state.step))

    writer = MetricWriter(workdir)
    if jax.process_index() == 0:
        overview = parameter_overview.get_parameter_overview(
            jax.tree.map(to_host, state.params), include_stats=False
        )
        logging.info("parameters:\n%s", overview)
        with open(os.path.join(workdir, "parameter_overview.txt"), "w", encoding="utf-8") as f:
            f.write(overview + "\n")
        num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
        _say(f"{num_params:,} parameters (overview in {workdir}/parameter_overview.txt)")

    step_fn = make_train_step(config, parts, objective, tx, routes)
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_sharding, sharding.batch_sharding(mesh), rest_sharding),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    sample_cfg = config.sample
    sampler = make_sample_fn(parts, objective, mesh, num_steps=sample_cfg.num_steps, guidance=sample_cfg.guidance)
    grid_labels = np.repeat(sample_cfg.get("classes", None) or np.arange(info.num_classes), sample_cfg.per_class)
    save_grids = _grid_writer(config.data, os.path.join(workdir, "samples"))
    # Imported here because evaluate imports this module (for ModelParts and restore_ema).
    from tread_jax import evaluate  # pylint: disable=g-import-not-at-top

    eval_every = config.eval.get("every", 0)
    in_loop_eval = evaluate.make_in_loop_evaluator(
        config, workdir, parts=parts, mesh=mesh, param_shardings=state_sharding.ema_params
    )

    total = config.num_train_steps
    stop = _StopSignal()
    metrics = None
    compiled_step = None
    last_scalars: dict[str, float] = {}
    loop_start = time.perf_counter()
    try:
        for step in range(start_step, total):
            batch = sharding.global_batch(next(data_iterator), mesh)
            if compiled_step is None:
                compiled_step = compile_everywhere(train_step, state, batch, rest)
                _say(f"compiled the train step in {time.perf_counter() - loop_start:.1f}s")
                throughput = Throughput(start_step)
            state, step_metrics = compiled_step(state, batch, rest)
            metrics = step_metrics if metrics is None else metrics.merge(step_metrics)
            done = step + 1
            preempted = checkpointer.reached_preemption(done)
            stopping = stop.requested or preempted
            log_now = done % config.log_every == 0 or done == total or stopping
            save_now = done % config.checkpoint_every == 0 or done == total or stopping
            if log_now or save_now:
                computed = metrics.compute()
                computed = {k: to_host(v) for k, v in computed.items()}
                _check_finite(computed, checkpointer)
            if log_now:
                steps_per_s = throughput.update(done)
                last_scalars = {
                    "loss": float(computed["loss"]),
                    "grad_norm": float(computed["grad_norm"]),
                    "learning_rate": float(computed["learning_rate"]),
                    "steps_per_s": steps_per_s,
                    "images_per_s": steps_per_s * config.global_batch_size,
                }
                writer.write_scalars(done, last_scalars)
                _say(progress_line(done, total, last_scalars, steps_per_s))
                metrics = None
            if save_now:
                checkpointer.save(done, state, data_iterator)
            if sample_cfg.every and (done % sample_cfg.every == 0 or done == total):
                images = sampler(state.ema_params, rest, grid_labels, config.seed)
                save_grids(images, grid_labels, f"step_{done:07d}", per_class_files=done == total)
            if in_loop_eval is not None and done % eval_every == 0:
                writer.write_scalars(done, evaluate.scalar_metrics(in_loop_eval(state.ema_params, rest, done)))
            if stopping:
                checkpointer.wait()
                _say(f"stop requested ({'preemption' if preempted else 'SIGTERM'}): saved step {done}, exiting")
                return {"step": done, "stopped": True, **last_scalars}
        checkpointer.wait()
        _say(f"trained steps {start_step}..{total} in {format_duration(time.perf_counter() - loop_start)}")
    finally:
        stop.restore()
        checkpointer.close()
        writer.close()

    result: dict[str, Any] = {"step": total, **last_scalars}
    if config.eval.report:
        result["report"] = quality_report(config, workdir, parts, objective, mesh, state, rest)
    return result


def quality_report(
    config: ml_collections.ConfigDict,
    workdir: str,
    parts: ModelParts,
    objective: diffusion.Objective,
    mesh: jax.sharding.Mesh,
    state: train_state.TrainState,
    rest: Any,
) -> dict[str, Any]:
    """Class-conditional samples from the EMA weights scored by the configured report."""
    if config.eval.report != "digits":
        raise ValueError(f"unknown eval.report {config.eval.report!r}; known: 'digits'")
    from tread_jax.metrics import digits as digits_metrics  # pylint: disable=g-import-not-at-top

    started = time.perf_counter()
    sampler = make_sample_fn(
        parts, objective, mesh, num_steps=config.eval.num_steps, guidance=config.eval.guidance
    )
    real_train = data.load_split_arrays(config.data, "train")
    real_test = data.load_split_arrays(config.data, "test")
    # By default one sample per training image, with its label: a Frechet distance estimated
    # from N samples is biased upwards by a term that shrinks with N (two random halves of the
    # real training digits are 1.5x the floor apart), so the generated side gets the same N
    # and class mix as the real training side of the floor it is compared with.
    num_samples = config.eval.get("num_samples", 0)
    labels = np.arange(num_samples) % parts.num_classes if num_samples else real_train[1]
    # Each draw is a fresh set of N samples; the report averages the draws, which keeps the
    # expected distance of N samples but not the luck of one set (it moves by about 0.05x the
    # floor between draws of the digits model).
    classifier = digits_metrics.DigitsClassifier(*real_train, seed=config.seed)
    draws = []
    for draw in range(config.eval.get("draws", 1)):
        # Seeds apart from the grids' so the report does not score the images shown in them.
        # Clipped to the data range, as saved images and the eval binary's samples are.
        images = np.clip(sampler(state.ema_params, rest, labels, config.seed + 1 + draw), -1.0, 1.0)
        draws.append(digits_metrics.digits_quality(images, labels, real_train, real_test, classifier=classifier))
    report = {key: float(np.mean([d[key] for d in draws])) for key in draws[0]}
    # The bar: generated-vs-test distance within 1.5x the real train-vs-test floor.
    report["fd_ratio_to_floor"] = report["fd_generated_vs_test"] / report["fd_train_vs_test"]
    report["fd_ratio_per_draw"] = [d["fd_generated_vs_test"] / d["fd_train_vs_test"] for d in draws]
    report["num_samples"] = len(labels)
    report["sampling_and_scoring_s"] = time.perf_counter() - started
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "quality_report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        _say("quality report: " + json.dumps(report))
    return report
