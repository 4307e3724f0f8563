# Helpers shared by the launch scripts (sourced, not run).
#
# Every command a script would run goes through `run`, so `--dry-run` prints exactly the
# argument vectors that a real run executes: one line per command, "+ " then the arguments
# quoted for a POSIX shell, ready to copy into one.

# shellcheck shell=bash

DRY_RUN=0
# shellcheck disable=SC2034  # used by the scripts that source this file
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() {
  printf '%s: error: %s\n' "${0##*/}" "$*" >&2
  exit 2
}

warn() {
  printf '%s: warning: %s\n' "${0##*/}" "$*" >&2
}

# Quotes each argument for a POSIX shell: plain words as they are, others in single quotes.
# Readable in --dry-run output, and valid for the workers' login shell whatever it is.
shell_join() {
  local arg out=() q="'"
  for arg in "$@"; do
    if [[ $arg =~ ^[-A-Za-z0-9_./=:,+@%]+$ ]]; then
      out+=("$arg")
    else
      out+=("$q${arg//$q/$q\\$q$q}$q")
    fi
  done
  printf '%s' "${out[*]}"
}

# Runs a command, or prints it under --dry-run.
run() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(shell_join "$@")"
  else
    "$@"
  fi
}

# Fails unless option $1 has a non-empty value $2 (call as `need_value "$@"`).
need_value() {
  [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value"
}

# Fails unless $2 (the value of option $1) is a positive integer.
need_positive_int() {
  [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}

# Fails unless $1 is a folder made by launch/download_wheels.sh. Sets WHEELS to its absolute
# path (the scripts change directory before installing) and OFFLINE_INSTALL to the arguments of
# `pip install` that install from it alone, whatever the index settings.
check_wheels() {
  [[ -f $1/requirements.txt ]] || die "--wheels $1 has no requirements.txt: make it with launch/download_wheels.sh"
  WHEELS=$(cd "$1" && pwd)
  # shellcheck disable=SC2034  # used by the scripts that source this file
  OFFLINE_INSTALL=(--no-index --find-links "$WHEELS" -r "$WHEELS/requirements.txt")
}

# Prints `--platform TAG` pairs (one word per line) for every manylinux tag a Linux host with
# CPU $1 (x86_64 or aarch64) and glibc 2.$2 runs: pip takes a wheel only if one of its tags is
# listed exactly, so list manylinux_2_17 .. manylinux_2_$2 and the older names of the same tags.
manylinux_platform_args() {
  local minor
  for ((minor = $2; minor >= 17; minor--)); do printf -- '--platform\nmanylinux_2_%s_%s\n' "$minor" "$1"; done
  printf -- '--platform\nmanylinux2014_%s\n' "$1"
  if [[ $1 == x86_64 ]]; then printf -- '--platform\n%s\n' manylinux2010_x86_64 manylinux1_x86_64; fi
}
