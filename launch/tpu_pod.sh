#!/usr/bin/env bash
# Train tread_jax on a Cloud TPU VM or pod slice (one or many hosts, same command).
#
# Usage: launch/tpu_pod.sh [options] COMMAND [-- CONFIG_OVERRIDES...]
#
# Commands (run them in this order; `all` runs create, setup, train, logs):
#   create   create the TPU VM (`gcloud compute tpus tpu-vm create`)
#   setup    copy the code to every worker and install it with jax[tpu] in a Python 3.12 venv
#   train    start the same training command on every worker (nohup; log in ~/tread_train.log)
#   logs     stream the training log of one worker (default worker 0, which writes the metrics)
#   stop     send SIGTERM to training on every worker (it saves a checkpoint at the current step)
#   status   describe the TPU VM
#   delete   delete the TPU VM
#
# Options (defaults in brackets):
#   --name NAME             TPU VM name [tread-jax]
#   --zone ZONE             [us-central2-b]
#   --project PROJECT       [gcloud's configured project]
#   --accelerator-type T    e.g. v4-8, v4-32, v5p-16, v5litepod-16, v6e-16 [v4-32]
#   --version RUNTIME       TPU software version [picked from the accelerator type]
#   --spot                  create a Spot TPU (preemptible; training resumes from checkpoints)
#   --repo-url URL          workers `git clone` this repository [copy this checkout with scp]
#   --ref REF               branch or tag to clone with --repo-url [the default branch]
#   --python VERSION        Python of the workers' venv (jax needs >= 3.11) [3.12]
#   --wheels DIR            setup copies DIR, a folder made by launch/download_wheels.sh
#                           (--accelerator tpu --glibc 2.35), to every worker and installs
#                           from it alone: no package index needed, but the workers' image
#                           must have python<VERSION> with its venv module
#   --config PATH           config file, relative to the repository root [configs/digits.py]
#   --workdir DIR           a gs://BUCKET/PATH URL or a path on every worker; must be shared
#                           storage on a multi-host slice
#                           [gs://BUCKET/tread_jax/NAME with --gcs-bucket, else ~/tread_runs/NAME]
#   --gcs-bucket BUCKET     keep the workdir in this Cloud Storage bucket (written natively by
#                           every worker with the VM's service account; nothing is mounted)
#   --worker N              worker whose log `logs` streams [0]
#   --dry-run               print every command instead of running it
#   -h, --help              show this help
#
# Multi-host: every worker runs `python -m tread_jax.main ... --distributed`, and
# jax.distributed.initialize() finds the coordinator, process count and process index from the
# TPU VM metadata; nothing is passed by hand. Each process reads its share of the data and
# writes its shards of every checkpoint, so on a slice with more than one host the workdir must
# be storage that all workers share (--gcs-bucket or a gs:// --workdir, or an NFS/Filestore
# mount); process 0 alone writes logs and sample grids. The data directory (a config override
# such as --config.data.data_dir=...) is read from a path on every worker: a local copy, NFS,
# or a bucket the workers mount themselves (gcsfuse).

set -euo pipefail
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

NAME=tread-jax
ZONE=us-central2-b
PROJECT=
ACCELERATOR=v4-32
RUNTIME=
SPOT=0
REPO_URL=
REF=
WHEELS=
PYTHON_VERSION=3.12
CONFIG=configs/digits.py
WORKDIR=
GCS_BUCKET=
WORKER=0
COMMAND=
OVERRIDES=()

while (($#)); do
  # Accept --flag=value as well as --flag value.
  if [[ $1 == --*=* ]]; then
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --accelerator-type) need_value "$@"; ACCELERATOR=$2; shift 2 ;;
    --version) need_value "$@"; RUNTIME=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --repo-url) need_value "$@"; REPO_URL=$2; shift 2 ;;
    --ref) need_value "$@"; REF=$2; shift 2 ;;
    --python) need_value "$@"; PYTHON_VERSION=$2; shift 2 ;;
    --wheels) need_value "$@"; WHEELS=$2; shift 2 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --gcs-bucket) need_value "$@"; GCS_BUCKET=${2#gs://}; shift 2 ;;
    --worker) need_value "$@"; WORKER=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *)
      [[ -z $COMMAND ]] || die "one command at a time, got '$COMMAND' and '$1'"
      COMMAND=$1; shift ;;
  esac
done

[[ -n $COMMAND ]] || die "missing command: create, setup, train, logs, stop, status, delete or all (see --help)"
# gcloud's rule for TPU names; checking it here also keeps the name safe inside remote commands.
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$NAME' must be lowercase letters, digits and hyphens"
[[ $ACCELERATOR =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] || die "--accelerator-type '$ACCELERATOR' is not like v4-32 or v6e-16"
[[ $WORKER =~ ^[0-9]+$ ]] || die "--worker must be a worker index, got '$WORKER'"
[[ $PYTHON_VERSION =~ ^3\.[0-9]+$ ]] || die "--python must be like 3.12, got '$PYTHON_VERSION'"
if [[ -n $REF && -z $REPO_URL ]]; then die "--ref needs --repo-url"; fi
if [[ -n $WHEELS ]]; then check_wheels "$WHEELS"; fi
for override in "${OVERRIDES[@]}"; do
  [[ $override == --config.* ]] || die "after --, only config overrides like --config.num_train_steps=100, got '$override'"
done

# The TPU software version recommended for JAX on each TPU generation.
if [[ -z $RUNTIME ]]; then
  case $ACCELERATOR in
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    *) die "no default software version for '$ACCELERATOR'; pass --version" ;;
  esac
fi

GCLOUD_SCOPE=(--zone="$ZONE")
if [[ -n $PROJECT ]]; then GCLOUD_SCOPE+=(--project="$PROJECT"); fi

# Paths on the workers, quoted so that $HOME expands in the worker's shell and not here.
remote_path() {
  # shellcheck disable=SC2016  # the literal $HOME is the point
  printf '"$HOME/%s"' "$1"
}
REMOTE_SRC=$(remote_path tread_jax)
REMOTE_VENV=$(remote_path tread_venv)
REMOTE_PYTHON=$(remote_path tread_venv/bin/python)
REMOTE_LOG=$(remote_path tread_train.log)
REMOTE_PID=$(remote_path tread_train.pid)
REMOTE_WHEELS=$(remote_path tread_wheels)
SOURCE_ARCHIVE=tread_jax_src.tar.gz
LOCAL_ARCHIVE="${TMPDIR:-/tmp}/${NAME}_${SOURCE_ARCHIVE}"
WHEELS_ARCHIVE=tread_wheels.tar
LOCAL_WHEELS_ARCHIVE="${TMPDIR:-/tmp}/${NAME}_${WHEELS_ARCHIVE}"

if [[ -n $WORKDIR ]]; then
  REMOTE_WORKDIR=$(shell_join "$WORKDIR")
elif [[ -n $GCS_BUCKET ]]; then
  REMOTE_WORKDIR=$(shell_join "gs://$GCS_BUCKET/tread_jax/$NAME")
else
  REMOTE_WORKDIR=$(remote_path "tread_runs/$NAME")
fi

# Joins remote steps with && so the first failure stops the worker's script.
steps() {
  local joined
  joined=$(printf ' && %s' "$@")
  printf '%s' "${joined# && }"
}

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_SCOPE[@]}" --worker=all --command="$1"
}

cmd_create() {
  local args=(gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_SCOPE[@]}"
    --accelerator-type="$ACCELERATOR" --version="$RUNTIME")
  if ((SPOT)); then args+=(--spot); fi
  run "${args[@]}"
}

cmd_setup() {
  local fetch
  if [[ -n $REPO_URL ]]; then
    local clone=(git clone --depth 1)
    if [[ -n $REF ]]; then clone+=(--branch "$REF"); fi
    fetch=$(steps "rm -rf $REMOTE_SRC" "$(shell_join "${clone[@]}" "$REPO_URL") $REMOTE_SRC")
  else
    # Ship this checkout as it is (uncommitted changes included), without build leftovers.
    run tar -czf "$LOCAL_ARCHIVE" -C "$REPO_ROOT" --exclude=.git --exclude=__pycache__ \
      --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.venv .
    run gcloud compute tpus tpu-vm scp "$LOCAL_ARCHIVE" "$NAME:$SOURCE_ARCHIVE" \
      "${GCLOUD_SCOPE[@]}" --worker=all
    fetch=$(steps "rm -rf $REMOTE_SRC" "mkdir -p $REMOTE_SRC" \
      "tar -xzf $(remote_path "$SOURCE_ARCHIVE") -C $REMOTE_SRC")
  fi
  local install
  if [[ -n $WHEELS ]]; then
    # One archive rather than `scp --recurse`, which would nest the folder inside an old copy.
    # Wheels are compressed already: no -z.
    run tar -cf "$LOCAL_WHEELS_ARCHIVE" -C "$WHEELS" .
    run gcloud compute tpus tpu-vm scp "$LOCAL_WHEELS_ARCHIVE" "$NAME:$WHEELS_ARCHIVE" \
      "${GCLOUD_SCOPE[@]}" --worker=all
    # No index to fetch uv or a Python build from: the image's own python<VERSION> makes the venv.
    install=$(steps "rm -rf $REMOTE_WHEELS" "mkdir -p $REMOTE_WHEELS" \
      "tar -xf $(remote_path "$WHEELS_ARCHIVE") -C $REMOTE_WHEELS" \
      "python$PYTHON_VERSION -m venv $REMOTE_VENV" \
      "$REMOTE_PYTHON -m pip install --no-index --find-links $REMOTE_WHEELS -r $REMOTE_WHEELS/requirements.txt")
  else
    local uv
    uv=$(remote_path .local/bin/uv)
    # uv brings its own Python build: the TPU images ship Python 3.10, jax needs >= 3.11.
    install=$(steps "python3 -m pip install --user --quiet --upgrade uv" \
      "$uv venv --allow-existing --python $PYTHON_VERSION $REMOTE_VENV" \
      "$uv pip install --python $REMOTE_PYTHON -e $REMOTE_SRC 'jax[tpu]'")
  fi
  local script
  script=$(steps "$fetch" "$install" \
    "$REMOTE_PYTHON -c 'import jax, tread_jax; print(\"jax\", jax.__version__)'")
  ssh_all "$script"
}

cmd_train() {
  local train=("-m" tread_jax.main --config="$CONFIG")
  local script=("cd $REMOTE_SRC"
    "if [ -f $REMOTE_PID ] && kill -0 \"\$(cat $REMOTE_PID)\" 2>/dev/null; then echo 'tread_jax is already training on this worker' >&2; exit 1; fi"
    "{ setsid nohup $REMOTE_PYTHON $(shell_join "${train[@]}") --workdir=$REMOTE_WORKDIR --distributed${OVERRIDES[*]:+ $(shell_join "${OVERRIDES[@]}")} > $REMOTE_LOG 2>&1 < /dev/null & echo \$! > $REMOTE_PID; }"
    "echo \"worker \$(hostname): training started, pid \$(cat $REMOTE_PID)\"")
  ssh_all "$(steps "${script[@]}")"
}

cmd_logs() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_SCOPE[@]}" --worker="$WORKER" \
    --command="tail -n +1 -F $REMOTE_LOG"
}

cmd_stop() {
  ssh_all "if [ -f $REMOTE_PID ]; then kill -TERM \"\$(cat $REMOTE_PID)\" 2>/dev/null || true; fi"
}

cmd_status() {
  run gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_SCOPE[@]}"
}

cmd_delete() {
  run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_SCOPE[@]}" --quiet
}

if [[ -z $WORKDIR && -z $GCS_BUCKET && $COMMAND =~ ^(train|all)$ ]]; then
  warn "workdir is each worker's local disk; a multi-host slice needs shared storage (--gcs-bucket, a gs:// --workdir or --workdir on NFS)"
fi

case $COMMAND in
  create) cmd_create ;;
  setup) cmd_setup ;;
  train) cmd_train ;;
  logs) cmd_logs ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  delete) cmd_delete ;;
  all) cmd_create; cmd_setup; cmd_train; cmd_logs ;;
  *) die "unknown command '$COMMAND': create, setup, train, logs, stop, status, delete or all" ;;
esac
