"""Bad input through the real command line: each case fails in one line that names the offending
flag, file or config field, with a non-zero exit, before anything is compiled or written.

Every case is ``tread_jax.main``'s real flag parsing, config loading and preflight on its own
command line (``cli_testlib``: one forked process per case, training stubbed out); one fixture
runs them all and each test checks one. The counts and intervals come from
``preflight.POSITIVE`` / ``NON_NEGATIVE``, so a field added there is tested here too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import cli_testlib
import trainer_testlib as tl
from tread_jax import data, preflight

DIGITS = "configs/digits.py"
IMAGENET = "configs/imagenet256.py:dit_s2"


def _has_field(config_arg: str, path: str) -> bool:
    file, _, variant = config_arg.partition(":")
    present, _ = preflight.get_field(tl.load_config(tl.REPO / file, variant or None), path)
    return present


def _count_cases() -> list[tuple[str, str, list[str], str]]:
    """(id, config, flags, expected text) for 0 and -1 of every count and interval."""
    cases = []
    for fields, values in ((preflight.POSITIVE, (0, -1)), (preflight.NON_NEGATIVE, (-1,))):
        for path in fields:
            config = DIGITS if _has_field(DIGITS, path) else IMAGENET
            for value in values:
                cases.append((f"{path}={value}", config, [f"--config.{path}={value}"], f"{path} must be"))
    return cases


# (id, config, extra flags, text the one line must contain); {tmp} is the case's directory,
# {data} a prepared digits data_dir, {file} a regular file.
CASES = [
    # Issue 13, case 3: files, fields and routes that do not parse.
    ("missing config file", "configs/nope.py", [], "configs/nope.py"),
    ("unknown field", DIGITS, ["--config.bogus_field=1"], "--config.bogus_field"),
    ("unknown nested field", DIGITS, ["--config.data.bogus=1"],
     "--config.data.bogus: configs/digits.py has no field 'bogus' (fields there: data_dir,"),
    ("misspelt section", DIGITS, ["--config.datta.data_dir=/x"], 'did you mean "data"'),
    ("routes do not parse", DIGITS, ["--config.routes=foo"], "routes ('foo',) do not parse"),
    ("value of the wrong type", DIGITS, ["--config.num_train_steps=abc"], "--config.num_train_steps=abc"),
    ("unknown variant", "configs/imagenet256.py:dit_q2", [], "unknown ImageNet variant 'dit_q2'"),
    ("unknown digits variant", "configs/digits.py:mamba", [], "unknown digits variant 'mamba'"),
    # Issue 13, case 4: every count and interval, zero and negative.
    *_count_cases(),
    ("sample steps below Heun's 2", DIGITS, ["--config.sample.num_steps=1"], "sample.num_steps"),
    ("eval steps 0", DIGITS, ["--config.eval.num_steps=0"], "eval.num_steps"),
    ("decay before the end", DIGITS, ["--config.optim.decay_steps=1000"], "optim.decay_steps (1000)"),
    ("decay within warmup", DIGITS, ["--config.optim.decay_steps=50"], "optim.decay_steps (50)"),
    # Routes, models, objectives, meshes.
    ("route out of range", DIGITS, ["--config.routes=((1, 8, 0.5),)"], "end=8"),
    ("route negative start", DIGITS, ["--config.routes=((-1, 3, 0.5),)"], "start=-1"),
    ("routes overlap", DIGITS, ["--config.routes=((1, 3, 0.5), (2, 5, 0.5))"], "overlap"),
    ("route ratio 1", DIGITS, ["--config.routes=((1, 3, 1.0),)"], "ratio"),
    ("route missing its end", DIGITS, ['--config.routes=({"start": 1},)'], "routes"),
    ("unknown model", DIGITS, ["--config.model.name=DiT-Q/2"], "DiT-Q/2"),
    ("unknown objective", DIGITS, ["--config.diffusion.name=ddim"], "ddim"),
    ("mesh that does not divide", DIGITS, ["--config.mesh.fsdp=3"], "mesh"),
    ("mesh axis 0", DIGITS, ["--config.mesh.data=0"], "sizes must be positive or -1"),
    ("the base, not a config", "configs/common.py", [], "--config=configs/common.py: AttributeError"),
    ("unknown dataset", DIGITS, ["--config.data.name=imagenet"], "'imagenet'"),
    # Files and directories.
    ("missing dataset dir", IMAGENET, ["--config.data.data_dir={tmp}/no_tfds"], "imagenet256_latents"),
    ("fine-tune from an empty workdir", "configs/imagenet256.py:dit_s2_tread_ft",
     ["--config.init_from={tmp}/routed", "--config.data.data_dir={data}"], "init_from"),
    ("unwritable workdir", DIGITS, ["--config.data.data_dir={data}", "--workdir={file}/run"], "workdir"),
    # The command itself.
    ("unknown flag", DIGITS, ["--bogus"], "bogus"),
    ("stray argument", DIGITS, ["extra"], "unexpected arguments"),
    ("half the multi-host flags", DIGITS, ["--num_processes=2"], "--coordinator_address"),
    ("process id out of range", DIGITS,
     ["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"], "--process_id=2"),
]


def _argv(config: str, extra: list[str], tmp: Path, data_dir: str) -> list[str]:
    values = {"{tmp}": str(tmp), "{data}": data_dir, "{file}": str(tmp / "a_file")}
    for key, value in values.items():
        extra = [arg.replace(key, value) for arg in extra]
    workdir = [] if any(a.startswith("--workdir=") for a in extra) else [f"--workdir={tmp}/run"]
    return ["tread_jax.main", f"--config={config}", *workdir, *extra]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[int, str, Path]]:
    """Every case's exit code, output and directory."""
    root = tmp_path_factory.mktemp("cli")
    data_dir = str(root / "tfds")
    data.dataset_info(tl.tiny_config(data_dir).data)  # prepares the digits once, before the runs
    runs = []
    for index, (name, config, extra, _) in enumerate(CASES):
        tmp = root / f"case{index}"
        tmp.mkdir()
        (tmp / "a_file").write_text("")
        runs.append((name, _argv(config, extra, tmp, data_dir), tmp, "run"))
    env = {**tl.subprocess_env(), "TREAD_JAX_CACHE": str(root / "cache")}
    found = cli_testlib.run_commands(runs, env)
    return {name: (*found[name][:2], Path(case_dir)) for name, _, case_dir, _ in runs}


@pytest.mark.parametrize("name, config, extra, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_in_one_line_before_any_work(results, name, config, extra, expected):
    code, output, tmp = results[name]
    output = output.strip()
    assert code != 0, output
    assert output.count("\n") == 0 and "Traceback" not in output, output
    assert output.startswith("tread_jax: error: "), output
    assert expected in output, output
    assert not (tmp / "run").exists(), "the workdir was created"
    assert not (tmp / "jax_cache").exists() or not any((tmp / "jax_cache").iterdir()), "something was compiled"


@pytest.mark.parametrize("module, needed", [
    ("tread_jax.main", ["--config", "--workdir", "--distributed", "--coordinator_address", "--num_processes",
                        "--process_id"]),
    ("tread_jax.evaluate", ["--config", "--workdir", "--distributed", "--coordinator_address", "--step",
                            "--num_samples", "--reference", "--save_npz"]),
    ("tread_jax.metrics.reference_stats", ["--config", "--adm_images", "--output", "--distributed",
                                           "--coordinator_address"]),
    ("tread_jax.data.prepare_latents", ["--source", "--data_dir", "--output_dir", "--distributed",
                                        "--coordinator_address"]),
])
def test_help_lists_every_flag_the_binary_needs(module, needed):
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tl.REPO, env=tl.subprocess_env(),
                          capture_output=True, text=True, timeout=60)
    listed = {line.split(":")[0].strip().replace("--[no]", "--") for line in done.stdout.splitlines()
              if line.strip().startswith("--")}
    assert not set(needed) - listed, done.stdout
    # Only what the binary uses: the trainer's flags are not the data preparation's.
    if module == "tread_jax.data.prepare_latents":
        assert "--config" not in listed and "--workdir" not in listed
