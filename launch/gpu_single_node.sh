#!/usr/bin/env bash
# Train tread_jax on the GPUs of one machine: one process that owns all of them.
#
# Usage: launch/gpu_single_node.sh [options] [-- CONFIG_OVERRIDES...]
#
# Options (defaults in brackets):
#   --gpus N              use GPUs 0..N-1 (sets CUDA_VISIBLE_DEVICES) [all visible GPUs]
#   --config PATH         config file, relative to the repository root [configs/digits.py]
#   --workdir DIR         checkpoints, logs and samples [/tmp/tread_jax_gpu]
#   --python PATH         Python interpreter with tread_jax installed [python3]
#   --install             first `pip install -e . jax[cuda12]` into that interpreter's environment
#   --cuda 12|13          CUDA major version of the jax wheels --install picks [12]
#   --wheels DIR          install offline from DIR, a folder made by launch/download_wheels.sh
#                         (no package index needed; implies --install, the CUDA version is
#                         the one DIR was made for)
#   --log FILE            also write the output to FILE (through tee)
#   --dry-run             print every command instead of running it
#   -h, --help            show this help
#
# Why one process: on a single machine a JAX process drives every local GPU itself. jit
# compiles one program over the device mesh, XLA inserts the collectives (NCCL over NVLink or
# PCIe), the input pipeline runs once per machine, and there is no coordinator to start: no
# jax.distributed.initialize, no process ids. One process per GPU only pays off across
# machines (see launch/slurm.sh); on one node it would add a coordinator, N input pipelines and
# N copies of host memory for nothing. The mesh's data axis spans all GPUs by default
# (config.mesh.data=-1), so the global batch must be divisible by the number of GPUs.

set -euo pipefail
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

GPUS=
CONFIG=configs/digits.py
WORKDIR=/tmp/tread_jax_gpu
PYTHON=python3
INSTALL=0
CUDA=12
WHEELS=
LOG=
OVERRIDES=()

while (($#)); do
  # Accept --flag=value as well as --flag value.
  if [[ $1 == --*=* ]]; then
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case $1 in
    --gpus) need_value "$@"; need_positive_int "$1" "$2"; GPUS=$2; shift 2 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --python) need_value "$@"; PYTHON=$2; shift 2 ;;
    --install) INSTALL=1; shift ;;
    --cuda) need_value "$@"; CUDA=$2; shift 2 ;;
    --wheels) need_value "$@"; WHEELS=$2; INSTALL=1; shift 2 ;;
    --log) need_value "$@"; LOG=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

[[ $CUDA == 12 || $CUDA == 13 ]] || die "--cuda must be 12 or 13, got '$CUDA'"
for override in "${OVERRIDES[@]}"; do
  [[ $override == --config.* ]] || die "after --, only config overrides like --config.num_train_steps=100, got '$override'"
done
# A config may name a variant after the file: configs/imagenet256.py:dit_xl2_tread.
[[ -f $REPO_ROOT/${CONFIG%%:*} || -f ${CONFIG%%:*} ]] || die "config file '${CONFIG%%:*}' not found"
if [[ -n $WHEELS ]]; then check_wheels "$WHEELS"; fi

run cd "$REPO_ROOT"

if [[ -n $WHEELS ]]; then
  run "$PYTHON" -m pip install "${OFFLINE_INSTALL[@]}"
elif ((INSTALL)); then
  run "$PYTHON" -m pip install -e . "jax[cuda$CUDA]"
fi

# No --distributed and no coordinator flags: a single process needs neither.
TRAIN=("$PYTHON" -m tread_jax.main --config="$CONFIG" --workdir="$WORKDIR" "${OVERRIDES[@]}")
if [[ -n $GPUS ]]; then
  TRAIN=(env CUDA_VISIBLE_DEVICES="$(seq -s, 0 $((GPUS - 1)))" "${TRAIN[@]}")
fi

if [[ -n $LOG ]]; then
  if ((DRY_RUN)); then
    printf '+ %s 2>&1 | %s\n' "$(shell_join "${TRAIN[@]}")" "$(shell_join tee -a "$LOG")"
  else
    "${TRAIN[@]}" 2>&1 | tee -a "$LOG"
  fi
else
  run "${TRAIN[@]}"
fi
