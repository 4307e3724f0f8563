#!/usr/bin/env bash
# Train tread_jax on several GPU nodes of a SLURM cluster: writes an sbatch script and submits it.
#
# Usage: launch/slurm.sh [options] [-- CONFIG_OVERRIDES...]
#
# Options (defaults in brackets):
#   --nodes N              number of nodes [2]
#   --gpus-per-node G      [8]
#   --task-per node|gpu    one process per node owning its G GPUs, or one per GPU [node]
#   --cpus-per-task N      [8 per GPU of the task]
#   --partition NAME       [the cluster's default]
#   --account NAME         [the cluster's default]
#   --time HH:MM:SS        wall-clock limit [24:00:00]
#   --job-name NAME        [tread_jax]
#   --config PATH          config file, relative to the repository root [configs/digits.py]
#   --workdir DIR          on storage every node shares; also holds the sbatch script and the
#                          job's output [~/tread_jax_runs/<job-name>]
#   --python PATH          Python with tread_jax installed, the same path on every node [python3]
#   --wheels DIR           install tread_jax and jax into --python from DIR, a folder made by
#                          launch/download_wheels.sh, before training (no package index needed);
#                          DIR and --python on storage every node shares
#   --port N               coordinator port [jax's choice, derived from the job id]
#   --prelude LINE         a line to run before training, e.g. 'module load cuda/12.4'; repeatable
#   --sbatch-arg ARG       an extra #SBATCH option, e.g. --sbatch-arg=--exclusive; repeatable
#   --dry-run              print the sbatch script and the commands instead of running them
#   -h, --help             show this help
#
# Multi-host: the job runs `srun python -m tread_jax.main ... --distributed` and relies on
# jax.distributed.initialize()'s SLURM auto-detection, which reads the coordinator (the first
# host of SLURM_STEP_NODELIST, port from SLURM_JOB_ID or JAX_COORDINATOR_PORT), the process
# count (SLURM_NTASKS) and this process's index (SLURM_PROCID). It would also give each process
# only the GPU numbered SLURM_LOCALID, which is right for one task per GPU but would leave a
# per-node task with GPU 0 alone; the script therefore sets JAX_LOCAL_DEVICE_IDS, which jax
# reads before auto-detecting: all G GPUs for a per-node task, device 0 of the one GPU that
# SLURM binds (--gpus-per-task=1) for a per-GPU task.
#
# One task per node is the default: one process drives all GPUs of its node (as in
# launch/gpu_single_node.sh), so each node runs one input pipeline and one copy of host state.
# Use --task-per gpu on clusters that give each task a single GPU.
#
# The job asks SLURM for SIGTERM 5 minutes before its time limit; training then saves a
# checkpoint and exits, and resubmitting the same command resumes from it.

set -euo pipefail
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

NODES=2
GPUS_PER_NODE=8
TASK_PER=node
CPUS_PER_TASK=
PARTITION=
ACCOUNT=
TIME=24:00:00
JOB_NAME=tread_jax
CONFIG=configs/digits.py
WORKDIR=
PYTHON=python3
PORT=
WHEELS=
PRELUDE=()
SBATCH_ARGS=()
OVERRIDES=()

while (($#)); do
  # Accept --flag=value as well as --flag value.
  if [[ $1 == --*=* ]]; then
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case $1 in
    --nodes) need_value "$@"; need_positive_int "$1" "$2"; NODES=$2; shift 2 ;;
    --gpus-per-node) need_value "$@"; need_positive_int "$1" "$2"; GPUS_PER_NODE=$2; shift 2 ;;
    --task-per) need_value "$@"; TASK_PER=$2; shift 2 ;;
    --cpus-per-task) need_value "$@"; need_positive_int "$1" "$2"; CPUS_PER_TASK=$2; shift 2 ;;
    --partition) need_value "$@"; PARTITION=$2; shift 2 ;;
    --account) need_value "$@"; ACCOUNT=$2; shift 2 ;;
    --time) need_value "$@"; TIME=$2; shift 2 ;;
    --job-name) need_value "$@"; JOB_NAME=$2; shift 2 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --python) need_value "$@"; PYTHON=$2; shift 2 ;;
    --wheels) need_value "$@"; WHEELS=$2; shift 2 ;;
    --port) need_value "$@"; need_positive_int "$1" "$2"; PORT=$2; shift 2 ;;
    --prelude) need_value "$@"; PRELUDE+=("$2"); shift 2 ;;
    # An sbatch option's value starts with --, so need_value's check does not apply.
    --sbatch-arg) [[ $# -ge 2 && $2 == -* ]] || die "--sbatch-arg needs an sbatch option like --exclusive"
      SBATCH_ARGS+=("$2"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

[[ $TASK_PER == node || $TASK_PER == gpu ]] || die "--task-per must be node or gpu, got '$TASK_PER'"
[[ $JOB_NAME =~ ^[-A-Za-z0-9_.]+$ ]] || die "--job-name '$JOB_NAME' must be letters, digits, '-', '_' or '.'"
[[ $TIME =~ ^([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}$ ]] || die "--time '$TIME' is not a SLURM time like 24:00:00"
if [[ -n $PORT ]] && ((PORT > 65535)); then die "--port $PORT is not a TCP port"; fi
for override in "${OVERRIDES[@]}"; do
  [[ $override == --config.* ]] || die "after --, only config overrides like --config.num_train_steps=100, got '$override'"
done
# A config may name a variant after the file: configs/imagenet256.py:dit_xl2_tread.
[[ -f $REPO_ROOT/${CONFIG%%:*} ]] || die "config file '${CONFIG%%:*}' not found under $REPO_ROOT"
WORKDIR=${WORKDIR:-$HOME/tread_jax_runs/$JOB_NAME}
if [[ -n $WHEELS ]]; then check_wheels "$WHEELS"; fi
# #SBATCH lines take no quoting: paths with whitespace cannot be written there.
for path in "$WORKDIR" "$REPO_ROOT"; do
  [[ $path != *[[:space:]]* ]] || die "path '$path' contains whitespace, which #SBATCH lines cannot hold"
done

if [[ $TASK_PER == node ]]; then
  TASKS_PER_NODE=1
  GPU_REQUEST=--gpus-per-node=$GPUS_PER_NODE
  LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS_PER_NODE - 1)))
  CPUS_PER_TASK=${CPUS_PER_TASK:-$((8 * GPUS_PER_NODE))}
else
  TASKS_PER_NODE=$GPUS_PER_NODE
  GPU_REQUEST=--gpus-per-task=1
  LOCAL_DEVICE_IDS=0
  CPUS_PER_TASK=${CPUS_PER_TASK:-8}
fi

SCRIPT_FILE=$WORKDIR/$JOB_NAME.sbatch
# srun gets --cpus-per-task again: SLURM 22.05+ steps no longer inherit it from the allocation.
TRAIN=(srun --kill-on-bad-exit=1 --cpus-per-task="$CPUS_PER_TASK" "$PYTHON" -m tread_jax.main --config="$CONFIG" --workdir="$WORKDIR"
  --distributed "${OVERRIDES[@]}")

sbatch_script() {
  local arg line
  printf '#!/bin/bash\n'
  printf '#SBATCH %s\n' --job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node="$TASKS_PER_NODE" \
    "$GPU_REQUEST" --cpus-per-task="$CPUS_PER_TASK" --time="$TIME" --chdir="$REPO_ROOT" \
    --output="$WORKDIR/slurm-%j.out" --signal=TERM@300
  if [[ -n $PARTITION ]]; then printf '#SBATCH --partition=%s\n' "$PARTITION"; fi
  if [[ -n $ACCOUNT ]]; then printf '#SBATCH --account=%s\n' "$ACCOUNT"; fi
  for arg in "${SBATCH_ARGS[@]}"; do printf '#SBATCH %s\n' "$arg"; done
  printf '%s\n' 'set -euo pipefail'
  for line in "${PRELUDE[@]}"; do printf '%s\n' "$line"; done
  if [[ -n $WHEELS ]]; then
    # Once, on the job's first node, before any task starts: the environment is shared.
    shell_join "$PYTHON" -m pip install "${OFFLINE_INSTALL[@]}"
    printf '\n'
  fi
  printf '%s\n' \
    "# jax.distributed.initialize() takes the coordinator, process count and index from SLURM;" \
    "# these are the local GPUs each process drives (see launch/slurm.sh)." \
    "export JAX_LOCAL_DEVICE_IDS=$LOCAL_DEVICE_IDS"
  if [[ -n $PORT ]]; then printf 'export JAX_COORDINATOR_PORT=%s\n' "$PORT"; fi
  # shellcheck disable=SC2016  # expands when the job runs
  printf '%s\n' 'echo "tread_jax: job $SLURM_JOB_ID, $SLURM_NTASKS processes on $SLURM_JOB_NODELIST"'
  shell_join "${TRAIN[@]}"
  printf '\n'
}

run mkdir -p "$WORKDIR"
if ((DRY_RUN)); then
  printf "+ cat > %s <<'SBATCH'\n" "$(shell_join "$SCRIPT_FILE")"
  sbatch_script
  printf 'SBATCH\n'
else
  sbatch_script >"$SCRIPT_FILE"
fi
run sbatch "$SCRIPT_FILE"
