"""The command line every binary shares: the config and workdir flags, multi-host setup, and a
runner that reports the user's mistakes in one line.

A binary defines the flags it needs, adopts them for its ``--help`` and runs through ``run``::

    _CONFIG = cli.define_config_flag("Training config file.")
    cli.define_multihost_flags()
    flags.adopt_module_key_flags(cli)
    ...
    if __name__ == "__main__":
        cli.run(main, "tread_jax")

Multi-process jobs call ``initialize_distributed`` before anything touches a device:
- Cloud TPU pods (and SLURM/Open MPI clusters): ``--distributed``; jax finds the coordinator and
  process ids from the environment.
- Anywhere else: ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` on every
  process.
A single process needs neither.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import jax
from absl import app, flags, logging
from ml_collections import config_flags


def load_config_module(path: str | os.PathLike) -> types.ModuleType:
    """A config file as a module, loaded by path as ``--config`` loads it: config files are not a
    package, so one that builds on another (``configs/common.py``) loads it this way."""
    spec = importlib.util.spec_from_file_location(f"tread_jax_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _existing(name: str) -> flags.FlagHolder | None:
    """The holder of an already defined flag: test processes import several binaries, and absl
    refuses a second definition."""
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS[name]) if name in flags.FLAGS else None


def define_config_flag(help_text: str, *, required: bool = True) -> flags.FlagHolder:
    """``--config=FILE[:VARIANT]`` with ``--config.FIELD=VALUE`` overrides; locked, so an
    override of a field the config does not have is an error rather than a new field."""
    holder = _existing("config") or config_flags.DEFINE_config_file("config", None, help_text, lock_config=True)
    if required:
        flags.mark_flag_as_required("config")
    return holder


def define_workdir_flag(help_text: str) -> flags.FlagHolder:
    """``--workdir``, required."""
    holder = _existing("workdir") or flags.DEFINE_string("workdir", None, help_text)
    flags.mark_flag_as_required("workdir")
    return holder


def define_multihost_flags() -> None:
    """``--distributed`` or ``--coordinator_address/--num_processes/--process_id``."""
    if _existing("distributed"):
        return
    flags.DEFINE_bool("distributed", False, "Initialize jax.distributed from the environment (TPU pods, SLURM).")
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (with --num_processes, --process_id).")
    flags.DEFINE_integer("num_processes", None, "Number of processes in the job.", lower_bound=1)
    flags.DEFINE_integer("process_id", None, "This process's index, 0-based.", lower_bound=0)


def initialize_distributed() -> None:
    """Starts jax.distributed for multi-process jobs; a no-op for a single process."""
    f = flags.FLAGS
    explicit = (f.coordinator_address, f.num_processes, f.process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise app.UsageError("--coordinator_address, --num_processes and --process_id go together")
        if f.process_id >= f.num_processes:
            raise app.UsageError(f"--process_id={f.process_id} must be below --num_processes={f.num_processes}")
        if f.num_processes > 1:
            jax.distributed.initialize(
                coordinator_address=f.coordinator_address, num_processes=f.num_processes, process_id=f.process_id
            )
    elif f.distributed:
        jax.distributed.initialize()


def start(argv: list[str]) -> None:
    """What every binary's ``main`` does first: refuse stray arguments, keep the libraries' INFO
    logs quiet unless ``--verbosity`` was given (Orbax and jax log every save; progress goes to
    stdout anyway), and join the multi-process job."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    initialize_distributed()


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Inside: a bad config value (ValueError), a missing file (FileNotFoundError) or an unusable
    directory (PermissionError) is the user's mistake, reported by ``run`` in one line."""
    try:
        yield
    except (ValueError, FileNotFoundError, PermissionError) as error:
        raise app.UsageError(str(error)) from error


def run(main: Callable[[list[str]], Any], name: str) -> None:
    """``app.run(main)`` where a flag that does not parse, a config file that does not load and an
    ``app.UsageError`` from ``main`` end the program with ``<name>: error: <one line>`` (exit 1)."""

    def parse(argv: list[str]) -> list[str]:
        try:
            rest = flags.FLAGS(argv)
        # config_flags raises more than flags.Error while parsing (KeyError for an unknown field).
        except Exception as error:  # pylint: disable=broad-except
            _exit(name, _parse_error_message(error, argv))
        _exit_if_config_failed(name, argv)
        return rest

    def checked_main(argv: list[str]) -> Any:
        try:
            return main(argv)
        except app.UsageError as error:
            _exit(name, str(error))

    app.run(checked_main, flags_parser=parse)


def _exit(name: str, message: str) -> NoReturn:
    sys.exit(f"{name}: error: {' '.join(message.split())}")


def _causes(error: BaseException) -> list[BaseException]:
    chain = [error]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(nxt)
    return chain


def _config_argument(argv: list[str]) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    return values[-1] if values else ""


def _parse_error_message(error: Exception, argv: list[str]) -> str:
    """One line naming the flag, config file or config field that did not parse."""
    causes = _causes(error)
    root = causes[-1]
    config = _config_argument(argv)
    if isinstance(root, OSError):
        return _config_file_message(config, root)
    field = str(root.args[0]) if isinstance(root, (KeyError, AttributeError)) and root.args else None
    overrides = [a[2:].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    named = next((o for o in overrides if field in o.split(".")[1:]), None) if field else None
    if named:
        # An unknown field: ml_collections may have suggested a near name; else list the fields.
        hints = (re.search(r'Did you mean ("[^"]*")', str(c)) for c in causes)
        hint = next((f"did you mean {h.group(1)}?" for h in hints if h), "")
        parts = named.split(".")[1:]
        hint = hint or _fields_at(config, parts[: parts.index(field)])
        message = f"--{named}: {config} has no field {field!r}"
        return f"{message} ({hint})" if hint else message
    if isinstance(error, flags.Error) and "\n" not in str(error):
        return str(error)  # absl's own messages name the flag and the value
    # Raised by the config file itself: a ValueError says what is wrong (an unknown variant).
    what = str(root) if isinstance(root, ValueError) else f"{type(root).__name__}: {root}"
    return f"--config={config}: {what}"


def _fields_at(config: str, parent: list[str]) -> str:
    """"fields there: a, b, c" of the config section ``parent``, or "" if it cannot be built."""
    file, _, variant = config.partition(":")
    try:
        node = load_config_module(file).get_config(*([variant] if variant else []))
        for key in parent:
            node = node[key]
        return "fields there: " + ", ".join(sorted(node.keys()))
    except Exception:  # pylint: disable=broad-except  # only a hint: the error is reported anyway
        return ""


def _config_file_message(config: str, error: OSError) -> str:
    path = config.split(":", 1)[0]
    if not os.path.isfile(path):
        return f"--config={config}: no such config file {path!r} (a path to a .py file with get_config)"
    return f"--config={config}: cannot load the config file: {error.strerror or error}"


def _exit_if_config_failed(name: str, argv: list[str]) -> None:
    """config_flags keeps a config file's load error until the config is first read: read it now."""
    if "config" not in flags.FLAGS or flags.FLAGS["config"].value is None:
        return
    try:
        getattr(flags.FLAGS["config"].value, "keys", None)  # the stand-in raises OSError on any access
    except OSError as error:
        _exit(name, _config_file_message(_config_argument(argv), _causes(error)[-1]))
