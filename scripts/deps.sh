#!/usr/bin/env bash
# Installs what building remus needs on Debian beyond Rust itself, and
# picks the cargo target directory. Sourced by demo.sh and test.sh.
#
# The rocksdb crate compiles RocksDB (C++) from source: that needs clang
# and libclang (for bindgen). The build is long when cold (see
# docs/benchmarks.md), so the target directory lives outside the checkout
# and is reused by every clone on this machine.
set -euo pipefail

missing=()
command -v clang >/dev/null 2>&1 || missing+=(clang)
dpkg -s libclang-dev >/dev/null 2>&1 || missing+=(libclang-dev)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (needed to build RocksDB)" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/remus-target}"
