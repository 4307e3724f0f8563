"""Entry point: ``python -m tread_jax.main --config=configs/digits.py --workdir=DIR``.

Config fields can be overridden on the command line (``--config.model.name=DiT-B/2``).
Multi-process jobs pass ``--distributed`` or ``--coordinator_address/--num_processes/--process_id``
(``tread_jax.cli``). Bad settings fail with one line before compiling anything. ``--check``
runs those checks and describes the run (mesh, parameters, FLOPs, memory) without training.
"""

from __future__ import annotations

from absl import app, flags

from tread_jax import cli, host_allocator, preflight, run_check, runtime, train

_CONFIG = cli.define_config_flag("Training config file, FILE[:VARIANT] (e.g. configs/imagenet256.py:dit_b2_tread).")
_WORKDIR = cli.define_workdir_flag("Directory for checkpoints, logs and samples; a rerun resumes from it.")
cli.define_multihost_flags()
flags.adopt_module_key_flags(cli)
_CHECK = flags.DEFINE_bool(
    "check", False, "Run the preflight checks and describe the run (config, mesh, parameters, FLOPs, "
    "memory per device) without training."
)


def main(argv: list[str]) -> None:
    cli.start(argv)
    config, workdir = _CONFIG.value, _WORKDIR.value
    runtime.StopSignal.install()  # the trainer honours a SIGTERM during preflight's data preparation too
    with cli.user_errors():
        if _CHECK.value:
            print(run_check.describe_run(config, workdir), flush=True)
            return
        preflight.check(config, workdir)
    try:
        train.train_and_evaluate(config, workdir)
    except FloatingPointError as error:  # the run diverged; the message names the step and what was kept
        raise app.UsageError(str(error)) from error


if __name__ == "__main__":
    host_allocator.reexec_with_reusable_heap()
    cli.run(main, "tread_jax")
