#!/usr/bin/env bash
# Download the wheels that benchmarks/accelerator.py needs and the device image lacks.
#
# Usage: benchmarks/accelerator_wheels.sh [--dry-run] [DIR]    [DIR: .whl]
#
# The accelerator machine's image (Python 3.12, x86_64, no network) has jax with CUDA, flax,
# optax, orbax-checkpoint, torch and most of their dependencies, but not grain, clu,
# ml-collections, tensorflow-datasets, tensorboardX or diffusers, nor the dependencies of those
# that it lacks; they are listed here by name and downloaded without their dependencies, so that
# nothing the image already has (jax, numpy, protobuf, ...) travels or replaces its own copy.
# The pins are the versions CI tests with. On the machine, from the repository root:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl
#   PYTHONPATH=/tmp/site:$PWD python3 benchmarks/accelerator.py --out_dir=OUT
#
# For a cluster with no packages at all, use launch/download_wheels.sh instead.

set -euo pipefail
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch/_common.sh"

DEST=.whl
while (($#)); do
  case $1 in
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) DEST=$1; shift ;;
  esac
done

MISSING=(
  grain==0.2.18 array-record dm-tree
  clu==0.0.12 ml-collections==1.1.0
  tensorflow-datasets==4.9.10 tensorflow-metadata googleapis-common-protos immutabledict
  simple-parsing docstring-parser termcolor toml portpicker
  tensorboardX==2.6.5
  diffusers==0.42.1 importlib-metadata
)
# tensorflow-datasets needs promise, which PyPI has as source only; pure Python, so a wheel
# built here installs there.
SOURCE_ONLY=(promise)

mapfile -t PLATFORM_ARGS < <(manylinux_platform_args x86_64 28)
run mkdir -p "$DEST"
run python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORM_ARGS[@]}" --dest "$DEST" "${MISSING[@]}"
run python3 -m pip wheel --no-deps --wheel-dir "$DEST" "${SOURCE_ONLY[@]}"
