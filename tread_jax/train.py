"""The training loop: ``train_and_evaluate(config, workdir)``.

One code path for one CPU, one GPU, fake CPU devices and multi-host pods: the state lives on
a ``(data, fsdp)`` mesh, the step (``train_step``) is a single ``jax.jit`` with explicit
shardings and the state's buffers donated, and every process feeds only its share of each
global batch. The loop syncs with the devices only at log, checkpoint and sample steps: the
next batches are already on the devices (``prefetch``), and the metrics are merged inside the
jitted call, which may run several steps (``config.steps_per_call``).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview
from etils import epath

from tread_jax import data, diffusion, preflight, pretrained, runtime, sharding, train_state, workdir as workdir_lib
from tread_jax.checkpoint import Checkpointer
from tread_jax.evaluation import TrainingEvaluator
from tread_jax.logging_utils import (
    NO_BAD_STEP, MetricWriter, Throughput, class_grid, format_duration, progress_line,
    save_class_grids)
from tread_jax.model_builder import ModelBuilder, imported_params, with_shardings
from tread_jax.prefetch import DevicePrefetcher
from tread_jax.profiling import StepProfiler
from tread_jax.sampler import Sampler
from tread_jax.train_step import jit_train_call, metrics_type


def _check_finite(computed: dict[str, np.ndarray], checkpointer: Checkpointer, step: int,
                  state_finite: bool) -> None:
    """Stops on the first non-finite loss or gradient, or on a non-finite state at ``step``
    (``state_finite`` False: the state about to be saved); such a state is never saved."""
    bad_step = int(computed["first_nonfinite_step"])
    if bad_step == NO_BAD_STEP and not state_finite:
        bad_step = step
    if bad_step != NO_BAD_STEP:
        checkpointer.wait()
        last = checkpointer.manager.latest_step()
        kept = f"the last good checkpoint is step {last} in {checkpointer.directory}" if last else "no checkpoint was written"
        raise FloatingPointError(f"non-finite loss, gradient or state at step {bad_step}; stopping ({kept})")


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
    runtime.say(f"initialised from {source.directory} step {restored[1]}")
    return restored


def _write_parameter_overview(workdir: str, params: Any) -> None:
    """The parameter table in the log and in ``parameter_overview.txt``; the count on the console."""
    if jax.process_index() != 0:
        return
    overview = parameter_overview.get_parameter_overview(jax.tree.map(runtime.to_host, params), include_stats=False)
    logging.info("parameters:\n%s", overview)
    (epath.Path(workdir) / "parameter_overview.txt").write_text(overview + "\n")
    num_params = sum(x.size for x in jax.tree.leaves(params))
    runtime.say(f"{num_params:,} parameters (overview in {workdir}/parameter_overview.txt)")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from ``workdir`` when it holds checkpoints), then runs the configured report.

    Returns the final logged scalars plus, when configured, the report. A SIGTERM at any point
    (start-up included) ends the run with everything saved so far kept.
    """
    # ---------------------------------------------------------------------------------- Setup
    # First, so that a SIGTERM during the (possibly long) start-up is seen and honoured.
    stop = runtime.StopSignal.install()
    try:
        info = preflight.check(config, workdir)
        runtime.enable_compilation_cache(config.get("compilation_cache_dir", ""), workdir)
        workdir_lib.record_dataset(workdir, info, config.data)
        routes = preflight.config_routes(config)
        mesh = sharding.create_mesh(config.mesh)
        objective = diffusion.create_objective(config.diffusion)
        tx = train_state.create_optimizer(config.optim)
        model = ModelBuilder(config, info)
        runtime.say(
            f"{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} device(s), "
            f"mesh {dict(mesh.shape)}; model {config.model.name} {dict(config.model.get('overrides', {}) or {})}, "
            f"routes {list(routes)}; dataset {info.name} {info.image_shape} x {info.num_train}"
        )

        def init() -> train_state.TrainState:
            return train_state.init_train_state(model.init_params(), tx)

        abstract_state = jax.eval_shape(init)
        state_sharding = sharding.state_shardings(abstract_state, mesh, config.fsdp_min_size)
        data_iterator = data.create_train_iterator(
            config.data, global_batch_size=config.global_batch_size, seed=config.seed,
            process_index=jax.process_index(), process_count=jax.process_count(), repa_images=model.repa is not None,
        )
        checkpointer = Checkpointer(workdir, save_interval_steps=config.checkpoint_every, max_to_keep=config.max_to_keep)
        abstract_sharded = with_shardings(abstract_state, state_sharding)
        restored = checkpointer.restore_latest(abstract_sharded, data_iterator)
        if restored is not None:
            runtime.say(f"resumed from checkpoint step {restored[1]}")
        elif pretrained.is_diffusers_source(config.get("init_from", "")):
            # An imported public DiT: its weights as parameters and EMA, a fresh optimizer, step 0.
            params = imported_params(model, pretrained.resolve(config.init_from), state_sharding.params)
            start = jax.jit(lambda p: train_state.init_train_state(p, tx), out_shardings=state_sharding)
            restored = runtime.compile_everywhere(start, params, name="init_imported")(params), 0
            runtime.say(f"initialised from the diffusers DiT {config.init_from}")
        elif config.get("init_from", ""):
            restored = _restore_init_from(config.init_from, abstract_sharded)
        if restored is None:
            state = runtime.compile_everywhere(jax.jit(init, out_shardings=state_sharding), name="init_state")()
            runtime.say("starting from scratch")
        else:
            state, _ = restored
        start_step = int(runtime.to_host(state.step))
        per_call = config.get("steps_per_call", 1)
        if start_step % per_call:  # the loop acts between calls: at multiples of steps_per_call
            raise ValueError(f"the run starts at step {start_step}, not a multiple of steps_per_call ({per_call})")
        _write_parameter_overview(workdir, state.params)

        train_call = jit_train_call(config, model, objective, tx, routes, mesh, state_sharding)
        empty_metrics = jax.jit(metrics_type(config).empty, out_shardings=sharding.replicated(mesh))
        state_is_finite = jax.jit(train_state.is_finite, out_shardings=sharding.replicated(mesh))
        sample_cfg = config.sample
        grid_labels = np.repeat(sample_cfg.get("classes", None) or np.arange(info.num_classes), sample_cfg.per_class)
        grid_sampler = None
        if sample_cfg.every:
            grid_sampler = Sampler(config, model, mesh, state_sharding.ema_params, num_steps=sample_cfg.num_steps,
                                   guidance_scale=sample_cfg.guidance,
                                   guidance_method=sample_cfg.get("guidance_method", "cfg"),
                                   guidance_sparsity=tuple(sample_cfg.get("guidance_sparsity", (0.75, 0.0))),
                                   name="grids")
        evaluations = TrainingEvaluator(config, workdir, model=model, mesh=mesh,
                                        param_shardings=state_sharding.ema_params)
        total = config.num_train_steps
        compile_start = time.perf_counter()
        batches = DevicePrefetcher(
            data_iterator, lambda batch: sharding.global_batch(batch, mesh, stacked=per_call > 1),
            depth=config.data.get("device_prefetch", 2), batches_per_item=per_call,
            num_items=(total - start_step) // per_call)
        metrics = empty_metrics()
        if start_step < total:
            train_call = runtime.compile_everywhere(train_call, state, batches.peek(), metrics, name="train_step")
            runtime.say(f"compiled the train step in {time.perf_counter() - compile_start:.1f}s")
        if stop.requested:  # nothing new since the last checkpoint: nothing to save
            checkpointer.close()
            runtime.say(f"stop requested (SIGTERM) before the first step: exiting at step {start_step}")
            return {"step": start_step, "stopped": True}
    except BaseException:
        stop.restore()
        raise

    # ----------------------------------------------------------------------------------- Loop
    # Records the interrupted run wrote after its last checkpoint are dropped: they are redone.
    writer = MetricWriter(workdir, start_step=start_step)
    profiler = StepProfiler(workdir, num_steps=config.get("profile_steps", 0), start_step=start_step,
                            steps_per_call=per_call)
    last_scalars: dict[str, float] = {}
    throughput = Throughput(start_step)
    loop_start = time.perf_counter()
    try:
        for done in range(start_step + per_call, total + 1, per_call):
            # ``position``: the input stream right after this call's batches, which a checkpoint
            # of ``done`` must record (the prefetcher has read further).
            batch, position = next(batches)
            profiler.before(done - per_call)
            state, metrics = train_call(state, batch, metrics)
            batches.refill()  # reads while the call computes
            profiler.after(done, state)
            # Every process asks about every step, so they agree on the preemption step at any K.
            preempted = any(checkpointer.reached_preemption(s) for s in range(done - per_call + 1, done + 1))
            stopping = stop.requested or preempted
            log_now = done % config.log_every == 0 or done == total or stopping
            save_now = done % config.checkpoint_every == 0 or done == total or stopping
            if log_now or save_now:
                computed = {k: runtime.to_host(v) for k, v in metrics.compute().items()}
                _check_finite(computed, checkpointer, done,
                              state_finite=not save_now or bool(runtime.to_host(state_is_finite(state))))
            if log_now:
                steps_per_s = throughput.update(done)
                last_scalars = {
                    "loss": float(computed["loss"]),
                    "grad_norm": float(computed["grad_norm"]),
                    "learning_rate": float(computed["learning_rate"]),
                    **({"alignment_loss": float(computed["alignment_loss"])} if "alignment_loss" in computed else {}),
                    "steps_per_s": steps_per_s,
                    "images_per_s": steps_per_s * config.global_batch_size,
                }
                writer.write_scalars(done, last_scalars)
                runtime.say(progress_line(done, total, last_scalars, steps_per_s))
                metrics = empty_metrics()
            if save_now:
                checkpointer.save(done, state, position)
            if grid_sampler is not None and (done % sample_cfg.every == 0 or done == total):
                images = grid_sampler.sample(state.ema_params, grid_labels, seed=config.seed)
                save_class_grids(images, grid_labels, os.path.join(workdir, "samples"), f"step_{done:07d}",
                                 per_class_files=done == total)
                writer.write_images(done, {"samples": np.asarray(class_grid(images, grid_labels))})
            if evaluations.due(done):
                writer.write_scalars(done, evaluations.periodic(state.ema_params, done))
            if stopping:
                checkpointer.wait()
                runtime.say(f"stop requested ({'preemption' if preempted else 'SIGTERM'}): saved step {done}, exiting")
                return {"step": done, "stopped": True, **last_scalars}
        checkpointer.wait()
        runtime.say(f"trained steps {start_step}..{total} in {format_duration(time.perf_counter() - loop_start)}")
    finally:
        profiler.stop()
        stop.restore()
        checkpointer.close()
        writer.close()

    # --------------------------------------------------------------------------------- Finish
    result: dict[str, Any] = {"step": total, **last_scalars}
    report = evaluations.final_report(state.ema_params)
    if report is not None:
        result["report"] = report
    return result
