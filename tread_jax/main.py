"""Entry point: ``python -m tread_jax.main --config=configs/digits.py --workdir=DIR``.

Config fields can be overridden on the command line (``--config.model.name=DiT-B/2``).
Multi-process jobs pass ``--distributed`` or ``--coordinator_address/--num_processes/--process_id``
(``tread_jax.cli``). Bad settings fail with one line before compiling anything.
"""

from __future__ import annotations

from absl import app, flags, logging

from tread_jax import cli, preflight, train

_CONFIG = cli.define_config_flag("Training config file, FILE[:VARIANT] (e.g. configs/imagenet256.py:dit_b2_tread).")
_WORKDIR = cli.define_workdir_flag("Directory for checkpoints, logs and samples; a rerun resumes from it.")
cli.define_multihost_flags()
flags.adopt_module_key_flags(cli)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        # Orbax and jax log every save at INFO; the progress lines go to stdout anyway.
        logging.set_verbosity(logging.WARNING)
    cli.initialize_distributed()
    config, workdir = _CONFIG.value, _WORKDIR.value
    with cli.user_errors():
        preflight.check(config, workdir)
    train.train_and_evaluate(config, workdir)


if __name__ == "__main__":
    cli.run(main, "tread_jax")
