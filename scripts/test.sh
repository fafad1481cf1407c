#!/usr/bin/env bash
# Runs the whole remus test suite, installing what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
# S3 tier tests: a real S3 server on loopback for the whole run.
source scripts/s3-server.sh
start=$(date +%s)
# QEMU, busybox and a guest kernel for the QEMU backend's tests, and the
# test guest's initramfs (both idempotent and quick when done before).
bash scripts/qemu-deps.sh >/dev/null
bash guest/build.sh >/dev/null
# The house style and lints first: a format or lint slip fails fast.
cargo fmt --all --check
cargo build --release --workspace --all-targets
echo "build: $(( $(date +%s) - start )) s" >&2
cargo clippy --release --workspace --all-targets --quiet -- -D warnings
echo "build and lints: $(( $(date +%s) - start )) s" >&2
cargo test --release --workspace
# The patched quinn-proto (third_party/quinn-proto/PATCHES.md) with its own
# unit tests, outside the workspace and its lints.
(cd third_party/quinn-proto && CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/../../target}/third-party" cargo test --locked --lib --quiet)
echo "build and tests: $(( $(date +%s) - start )) s" >&2
