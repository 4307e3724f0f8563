#!/usr/bin/env bash
# Download every wheel tread_jax needs on a host that cannot reach a package index.
#
# Usage: launch/download_wheels.sh [options] DIR
#
# Run it where pip can reach PyPI; copy DIR to the cluster; install there with the line it
# prints (the launch scripts do that for you with --wheels DIR):
#   python3 -m pip install --no-index --find-links DIR -r DIR/requirements.txt
#
# Options (defaults in brackets):
#   --accelerator A       jax's accelerator wheels: cpu, cuda12, cuda13 or tpu [cuda12]
#   --python-version V    the target's Python, e.g. 3.12 (jax needs >= 3.11) [3.12]
#   --arch A              the target's CPU: x86_64 or aarch64 [x86_64]
#   --glibc V             the target's glibc (`ldd --version`); wheels built for it or older
#                         are taken. RHEL/Rocky 8: 2.28, Ubuntu 22.04 (TPU VMs): 2.35 [2.28]
#   --platform TAG        a wheel platform tag to accept instead of --arch/--glibc's, e.g.
#                         macosx_14_0_arm64; repeatable
#   --python PATH         the interpreter whose pip downloads [python3]
#   --dry-run             print every command instead of running it
#   -h, --help            show this help
#
# DIR receives: a wheel of tread_jax built from this checkout; the wheels of its dependencies
# (pyproject.toml) and of jax with the chosen accelerator extra, for the target's platform and
# Python, resolved together so that their versions agree; wheels built here of the pure-Python
# dependencies that PyPI has only as source (tensorflow-datasets needs `promise`); and
# requirements.txt, naming what to install from DIR.

set -euo pipefail
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

ACCELERATOR=cuda12
PYTHON_VERSION=3.12
ARCH=x86_64
GLIBC=2.28
PLATFORMS=()
PYTHON=python3
DEST=
# Needed by the dependencies and published on PyPI as source only; pure Python, so a wheel
# built here installs on any platform.
SOURCE_ONLY=(promise)

while (($#)); do
  # Accept --flag=value as well as --flag value.
  if [[ $1 == --*=* ]]; then
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case $1 in
    --accelerator) need_value "$@"; ACCELERATOR=$2; shift 2 ;;
    --python-version) need_value "$@"; PYTHON_VERSION=$2; shift 2 ;;
    --arch) need_value "$@"; ARCH=$2; shift 2 ;;
    --glibc) need_value "$@"; GLIBC=$2; shift 2 ;;
    --platform) need_value "$@"; PLATFORMS+=("$2"); shift 2 ;;
    --python) need_value "$@"; PYTHON=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *)
      [[ -z $DEST ]] || die "one folder at a time, got '$DEST' and '$1'"
      DEST=$1; shift ;;
  esac
done

[[ -n $DEST ]] || die "missing the folder to download into (see --help)"
case $ACCELERATOR in
  cpu) JAX=jax ;;
  cuda12 | cuda13 | tpu) JAX="jax[$ACCELERATOR]" ;;
  *) die "--accelerator must be cpu, cuda12, cuda13 or tpu, got '$ACCELERATOR'" ;;
esac
[[ $PYTHON_VERSION =~ ^3\.[0-9]+$ ]] || die "--python-version must be like 3.12, got '$PYTHON_VERSION'"
[[ $ARCH == x86_64 || $ARCH == aarch64 ]] || die "--arch must be x86_64 or aarch64, got '$ARCH'"
[[ $GLIBC =~ ^2\.([0-9]+)$ ]] || die "--glibc must be like 2.28, got '$GLIBC'"
GLIBC_MINOR=${BASH_REMATCH[1]}
((GLIBC_MINOR >= 17)) || die "--glibc $GLIBC is older than any jax wheel supports (2.17)"

PLATFORM_ARGS=()
if ((${#PLATFORMS[@]})); then
  for platform in "${PLATFORMS[@]}"; do PLATFORM_ARGS+=(--platform "$platform"); done
else
  mapfile -t PLATFORM_ARGS < <(manylinux_platform_args "$ARCH" "$GLIBC_MINOR")
fi

# Pinned to this checkout's version, so that no other tread_jax an index may hold can win.
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO_ROOT/pyproject.toml")
[[ -n $VERSION ]] || die "no version in $REPO_ROOT/pyproject.toml"
REQUIREMENTS=("tread_jax==$VERSION" "$JAX")

run mkdir -p "$DEST"
# tread_jax itself: a pure-Python wheel of this checkout.
run "$PYTHON" -m pip wheel --no-deps --wheel-dir "$DEST" "$REPO_ROOT"
run "$PYTHON" -m pip wheel --no-deps --wheel-dir "$DEST" "${SOURCE_ONLY[@]}"
# One resolution for everything, with the wheels above found in DEST (--find-links).
run "$PYTHON" -m pip download --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  "${PLATFORM_ARGS[@]}" --find-links "$DEST" --dest "$DEST" "${REQUIREMENTS[@]}"
if ((DRY_RUN)); then
  printf "+ cat > %s <<'REQUIREMENTS'\n" "$(shell_join "$DEST/requirements.txt")"
  printf '%s\n' "${REQUIREMENTS[@]}" REQUIREMENTS
else
  printf '%s\n' "${REQUIREMENTS[@]}" >"$DEST/requirements.txt"
fi

printf '\nOffline install on the target (Python %s, %s), after copying %s there:\n  %s\n' \
  "$PYTHON_VERSION" "${PLATFORM_ARGS[1]}" "$DEST" \
  "$(shell_join python3 -m pip install --no-index --find-links "$DEST" "${REQUIREMENTS[@]}")"
