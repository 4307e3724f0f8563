"""Entry point: ``python -m tread_jax.main --config=configs/digits.py --workdir=DIR``.

Config fields can be overridden on the command line (``--config.model.name=DiT-B/2``).

Multi-process jobs call ``jax.distributed.initialize`` before anything touches a device:
- Cloud TPU pods (and SLURM/Open MPI clusters): pass ``--distributed`` and jax finds the
  coordinator and process ids from the environment.
- Anywhere else: ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` on
  every process.
A single process needs neither. Bad settings fail with one line before compiling anything.
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from tread_jax import preflight, run_check, runtime, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Initialize jax.distributed from the environment (TPU pods, SLURM)."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")
_CHECK = flags.DEFINE_bool(
    "check", False, "Run the preflight checks and describe the run (config, mesh, parameters, FLOPs, "
    "memory per device) without training."
)
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
    """Starts jax.distributed for multi-process jobs; a no-op for a single process."""
    explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise app.UsageError("--coordinator_address, --num_processes and --process_id go together")
        if _NUM_PROCESSES.value > 1:
            jax.distributed.initialize(
                coordinator_address=_COORDINATOR.value,
                num_processes=_NUM_PROCESSES.value,
                process_id=_PROCESS_ID.value,
            )
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        # Orbax and jax log every save at INFO; the progress lines go to stdout anyway.
        logging.set_verbosity(logging.WARNING)
    initialize_distributed()
    config, workdir = _CONFIG.value, _WORKDIR.value
    runtime.StopSignal.install()  # the trainer honours a SIGTERM during preflight's data preparation too
    try:
        if _CHECK.value:
            print(run_check.describe_run(config, workdir), flush=True)
            return
        preflight.check(config, workdir)
    except (ValueError, FileNotFoundError, PermissionError) as error:
        # One clear line instead of a traceback: these are mistakes in the command or config.
        sys.exit(f"tread_jax: error: {error}")
    train.train_and_evaluate(config, workdir)


if __name__ == "__main__":
    app.run(main)
