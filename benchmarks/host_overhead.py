"""Host overhead of the training loop: the loop's time per step minus the pure step's.

The model is so small (DiT depth 1, width 32, batch 4 digits) that the step itself is nearly
free, so what remains is what the loop adds per step: reading and placing batches, dispatch,
metrics, checks. In one process, repetitions alternate a real ``train_and_evaluate`` run with
the bare jitted step (``make_train_step``) on one batch already on the device; the loop's time
per step is the steps/s of its last log window (steady state; compile and start-up excluded).
Reported: medians over repetitions.

    python benchmarks/host_overhead.py --steps=400 --repeats=5 --json_out=/tmp/overhead.json
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import jax
import ml_collections
from absl import app, flags, logging

from _common import environment, write_json
from tread_jax import cli, data, diffusion, preflight, sharding, train, train_state
from tread_jax.model_builder import ModelBuilder
from tread_jax.train_step import make_train_step

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 400, "train steps per loop run (even); the second half is timed")
flags.DEFINE_integer("repeats", 5, "loop runs and bare-step runs, alternating")
flags.DEFINE_integer("batch", 4, "global batch size")
flags.DEFINE_integer("steps_per_call", 1, "config.steps_per_call (where the trainer has it)")
flags.DEFINE_string("data_dir", None, "digits data_dir (default: the tread_jax cache)")
flags.DEFINE_string("json_out", "", "also write the results here as JSON")

ROOT = Path(__file__).resolve().parents[1]


def tiny_config() -> ml_collections.ConfigDict:
    config = cli.load_config_module(ROOT / "configs" / "digits.py").get_config()
    config.model.overrides = dict(depth=1, hidden_size=32, num_heads=2)
    config.routes = ()
    if FLAGS.data_dir:
        config.data.data_dir = FLAGS.data_dir
    config.global_batch_size = FLAGS.batch
    config.num_train_steps = FLAGS.steps
    config.log_every = FLAGS.steps // 2
    config.checkpoint_every = FLAGS.steps
    config.sample.every = 0
    config.eval.report = ""
    if "steps_per_call" in config:  # the same script measures the trainer before it had these
        config.steps_per_call = FLAGS.steps_per_call
        config.compilation_cache_dir = ""
    return config


def loop_seconds_per_step(config: ml_collections.ConfigDict) -> float:
    with tempfile.TemporaryDirectory() as workdir:
        return 1.0 / train.train_and_evaluate(config, workdir)["steps_per_s"]


def bare_step_seconds_per_step(config: ml_collections.ConfigDict) -> float:
    """The same step, jitted the same way, on one batch that stays on the device."""
    info = data.dataset_info(config.data)
    model = ModelBuilder(config, info)
    tx = train_state.create_optimizer(config.optim)
    mesh = sharding.create_mesh(config.mesh)

    def init() -> train_state.TrainState:
        return train_state.init_train_state(model.init_params(), tx)

    state_sharding = sharding.state_shardings(jax.eval_shape(init), mesh, config.fsdp_min_size)
    state = jax.jit(init, out_shardings=state_sharding)()
    step = jax.jit(make_train_step(config, model, diffusion.create_objective(config.diffusion), tx,
                                   preflight.config_routes(config)),
                   in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))
    iterator = data.create_train_iterator(config.data, global_batch_size=config.global_batch_size,
                                          seed=0, process_index=0, process_count=1)
    batch = sharding.global_batch(next(iterator), mesh)
    timed = config.num_train_steps // 2
    for _ in range(3):  # compile and warm up
        state, _ = step(state, batch)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(timed):
        state, _ = step(state, batch)
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / timed


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    config = tiny_config()
    loop, bare = [], []
    for _ in range(FLAGS.repeats):
        loop.append(loop_seconds_per_step(config))
        bare.append(bare_step_seconds_per_step(config))
    overheads = [a - b for a, b in zip(loop, bare)]
    summary = {
        "steps": FLAGS.steps, "batch": FLAGS.batch, "steps_per_call": FLAGS.steps_per_call,
        "loop_ms_per_step_median": 1e3 * statistics.median(loop),
        "bare_step_ms_median": 1e3 * statistics.median(bare),
        "overhead_ms_per_step_median": 1e3 * statistics.median(overheads),
        "loop_over_bare_median": statistics.median(a / b for a, b in zip(loop, bare)),
        "loop_ms_all": [1e3 * s for s in loop], "bare_ms_all": [1e3 * s for s in bare],
        "environment": environment(),
    }
    print(f"loop {summary['loop_ms_per_step_median']:.2f} ms/step, bare step {summary['bare_step_ms_median']:.2f} "
          f"ms, overhead {summary['overhead_ms_per_step_median']:.2f} ms/step (median of {FLAGS.repeats})")
    write_json(FLAGS.json_out, summary)


if __name__ == "__main__":
    app.run(main)
