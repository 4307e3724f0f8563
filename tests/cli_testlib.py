"""Runs many command lines of the binaries in one process, each as the binary itself would.

A driver process imports the libraries once (about 1 s of every process on this CPU) and forks
one child per command line: the child imports the binary's module, defines its flags and runs
``cli.run`` on the command line with fresh flags, so flag parsing, config loading and preflight
are the real ones. Training itself is replaced by a stub that prints ``PREFLIGHT_PASSED``, so a
command that passes preflight costs nothing and a bad case that slips through cannot start a run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import trainer_testlib as tl

PREFLIGHT_PASSED = "PREFLIGHT_PASSED"
FLAGS_PARSED = "FLAGS_PARSED"
# The name each binary's one-line errors start with.
BINARY_NAMES = {"tread_jax.main": "tread_jax", "tread_jax.data.prepare_latents": "prepare_latents"}

# argv[1]: JSON {"names": BINARY_NAMES, "commands": [[name, argv, case_dir, mode], ...]}; argv[0]
# of each command is the binary's module.
# mode "run": the binary's own main (tread_jax.main: preflight, then the training stub);
# "parse": flag parsing and config loading only. Prints {name: [exit code, output, error type]},
# the error type being the exception that the one-line error came from (FileNotFoundError, ...).
_DRIVER = r"""
import importlib, json, os, sys
import jax
from tread_jax import cli, train

train.train_and_evaluate = lambda config, workdir: print("PREFLIGHT_PASSED")
payload = json.loads(sys.argv[1])
results = {}
for name, argv, case_dir, mode in payload["commands"]:
    output = os.path.join(case_dir, "output.txt")
    pid = os.fork()
    if pid == 0:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        # Anything compiled would leave an entry here.
        jax.config.update("jax_compilation_cache_dir", os.path.join(case_dir, "jax_cache"))
        module = importlib.import_module(argv[0])
        if hasattr(module, "_define_flags"):  # binaries that define their flags only when run
            module._define_flags()
        main = module.main if mode == "run" else (lambda _: print("FLAGS_PARSED"))
        sys.argv = argv
        code, kind = 0, ""
        try:
            cli.run(main, payload["names"].get(argv[0], argv[0]))
        except SystemExit as exit_:
            code = 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
            if isinstance(exit_.code, str):
                print(exit_.code, file=sys.stderr)
            error = exit_.__context__
            kind = type(error.__cause__ or error).__name__ if error is not None else ""
        sys.stdout.flush()
        sys.stderr.flush()
        with open(output + ".kind", "w") as f:
            f.write(kind)
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    with open(output) as out, open(output + ".kind") as kind:
        results[name] = [os.waitstatus_to_exitcode(status), out.read(), kind.read()]
print(json.dumps(results))
"""


def run_commands(commands: list[tuple[str, list[str], Path, str]],
                 env: dict[str, str]) -> dict[str, tuple[int, str, str]]:
    """``{name: (exit code, output, error type)}`` of ``(name, argv, case_dir, mode)`` commands."""
    payload = json.dumps({"names": BINARY_NAMES,
                          "commands": [[name, argv, str(case_dir), mode] for name, argv, case_dir, mode in commands]})
    done = subprocess.run([sys.executable, "-c", _DRIVER, payload], cwd=tl.REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: tuple(result) for name, result in json.loads(done.stdout.splitlines()[-1]).items()}
