"""Every command line and config override that the documentation tells users to type works as
written: the README, the config files, the launch scripts, the notebook and the binaries'
docstrings are parsed here, so a command added to any of them is checked too.

- A full command (``python -m tread_jax.<binary> ...``) goes through the binary's flag parsing
  and config loading; the trainer's also through preflight (training stubbed out). Paths of data
  that is not on this machine (``/data/tfds``, a routed run's workdir) may fail preflight, but
  only with the FileNotFoundError one-liner; a flag that does not parse never passes.
- An override mentioned on its own (``--config.eval.every=0``) must parse against the config of
  the file that mentions it, or against the digits or the ImageNet config.
- The notebook sets config fields in Python; each must also be settable from the command line.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

import pytest

import cli_testlib
import trainer_testlib as tl

REPO = tl.REPO
DOCUMENTS = sorted(
    [REPO / "README.md", REPO / "benchmarks" / "README.md", *REPO.glob("configs/*.py"), *REPO.glob("launch/*.sh"),
     *REPO.glob("notebooks/*.ipynb"), *REPO.glob("tread_jax/**/*.py")]
)
# The configs a lone override is tried against when the document is not a config file itself.
FALLBACK_CONFIGS = ("configs/digits.py", "configs/imagenet256.py")
_COMMAND = re.compile(r"python3? -m (tread_jax(?:\.\w+)+)([^`\n]*)")
_OVERRIDE = re.compile(r"--config\.[a-z_][a-z0-9_.]*=(?:'[^'\n]*'|\"[^\"\n]*\"|[^\s`'\",;)]*)")
# A launch script's --config option, handed to the trainer as --config=.
_LAUNCH_CONFIG = re.compile(r"launch/\w+\.sh [^\n]*?--config[ =](\S+)")
_NOTEBOOK_FIELD = re.compile(r"\b(?:config|timed)\.([\w.]+)\s*=(?!=)")


def _text(path: Path) -> str:
    """What a reader of the document sees (a Python file's docstrings and comments, a notebook's
    cells), with continued lines (backslash newline) joined."""
    text = path.read_text()
    if path.suffix == ".ipynb":
        text = "\n".join("".join(cell["source"]) for cell in json.loads(text)["cells"])
    elif path.suffix == ".py":
        nodes = [n for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))]
        docstrings = [ast.get_docstring(n) or "" for n in nodes]
        comments = [line.split("#", 1)[1] for line in text.splitlines() if line.strip().startswith("#")]
        text = "\n".join(docstrings + comments)
    return re.sub(r"\\\n\s*", " ", text)


def _commands() -> list[tuple[str, list[str]]]:
    found = {}
    for path in DOCUMENTS:
        for match in _COMMAND.finditer(_text(path)):
            args = shlex.split(match.group(2), comments=True)
            if not args or "..." in args:  # the binary named in prose, or an elided command
                continue
            found.setdefault(f"{path.relative_to(REPO)}: {match.group(0).strip()}", [match.group(1), *args])
        for config in _LAUNCH_CONFIG.findall(_text(path)):
            # What the launch script runs on every worker, less the launch-only options.
            found.setdefault(f"{path.relative_to(REPO)}: launch --config {config}",
                             ["tread_jax.main", f"--config={config}", "--workdir=DIR"])
    return sorted(found.items())


def _overrides() -> list[tuple[str, str, str]]:
    """(id, config file, override) for every override mentioned on its own or set in the notebook."""
    found = {}
    for path in DOCUMENTS:
        text = _text(path)
        in_commands = {o for m in _COMMAND.finditer(text) for o in _OVERRIDE.findall(m.group(0))}
        configs = (str(path.relative_to(REPO)),) if path.parent.name == "configs" else FALLBACK_CONFIGS
        for override in set(_OVERRIDE.findall(text)) - in_commands:
            found.setdefault(f"{path.relative_to(REPO)}: {override}", (configs, shlex.split(override)[0]))
        if path.suffix == ".ipynb":
            digits = tl.load_config()
            for field in set(_NOTEBOOK_FIELD.findall(text)):
                value = digits
                for key in field.split("."):
                    value = value[key]
                written = value if isinstance(value, str) else repr(tuple(value) if isinstance(value, list) else value)
                found.setdefault(f"{path.relative_to(REPO)}: {field}",
                                 (FALLBACK_CONFIGS[:1], f"--config.{field}={written}"))
    return [(name, configs, override) for name, (configs, override) in sorted(found.items())]


COMMANDS = _commands()
OVERRIDES = _overrides()


def test_the_documents_were_read():
    """The extraction finds what it must (a failure here means the patterns above went stale)."""
    names = " ".join(name for name, _ in COMMANDS)
    for expected in ("README.md: python -m tread_jax.main --config=configs/digits.py",
                     "configs/imagenet256.py: python -m tread_jax.main "
                     "--config=configs/imagenet256.py:dit_xl2_tread_ft",
                     "README.md: python -m tread_jax.evaluate", "tread_jax.metrics.reference_stats",
                     "tread_jax.data.prepare_latents"):
        assert expected in names, names
    fields = " ".join(o for _, _, o in OVERRIDES)
    for expected in ("--config.eval.every=0", "--config.routes=", "--config.init_from=", "--config.log_every="):
        assert expected in fields, fields


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[int, str, str]]:
    root = tmp_path_factory.mktemp("documented")
    runs = []
    for index, (name, argv) in enumerate(COMMANDS):
        case_dir = root / f"command{index}"
        case_dir.mkdir()
        # The documented workdir (/ckpt/..., /tmp/tread_digits) is redirected into the test's folder.
        argv = [f"--workdir={case_dir}/run" if a.startswith("--workdir=") else a for a in argv]
        runs.append((name, argv, case_dir, "run" if argv[0] == "tread_jax.main" else "parse"))
    for index, (name, configs, override) in enumerate(OVERRIDES):
        for config in configs:
            case_dir = root / f"override{index}_{Path(config).stem}"
            case_dir.mkdir()
            argv = ["tread_jax.main", f"--config={config}", f"--workdir={case_dir}/run", override]
            runs.append((f"{name} @ {config}", argv, case_dir, "parse"))
    env = {**tl.subprocess_env(), "TREAD_JAX_CACHE": str(root / "cache")}
    return cli_testlib.run_commands(runs, env)


@pytest.mark.parametrize("name, argv", COMMANDS, ids=[name for name, _ in COMMANDS])
def test_documented_command_parses_and_passes_preflight(results, name, argv):
    code, output, error = results[name]
    if code == 0:
        passed = cli_testlib.PREFLIGHT_PASSED if argv[0] == "tread_jax.main" else cli_testlib.FLAGS_PARSED
        assert passed in output, output
    else:
        # Only data or checkpoints that are not on this machine may stop it, in one line.
        assert error == "FileNotFoundError", output
        assert output.strip().count("\n") == 0, output


@pytest.mark.parametrize("name, configs, override", OVERRIDES, ids=[name for name, _, _ in OVERRIDES])
def test_documented_override_parses(results, name, configs, override):
    outcomes = {config: results[f"{name} @ {config}"] for config in configs}
    assert any(code == 0 and cli_testlib.FLAGS_PARSED in out for code, out, _ in outcomes.values()), outcomes
