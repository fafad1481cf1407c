#!/usr/bin/env bash
# Builds remus and runs `remus demo` on the embedded defaults: a 1 GiB
# in-process guest at 40 Hz replicated over QUIC with mutual TLS to a
# local backup with a RocksDB store, then verified restores.
# Extra arguments go to `remus demo` (e.g. --seconds 30 --json).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
# The same build as scripts/test.sh (tests and benches included): cargo
# unifies dependency features differently for a bins-only build, which
# would rebuild tokio, the S3 client and everything above them (3.5 min).
cargo build --release --workspace --all-targets
exec "$CARGO_TARGET_DIR/release/remus" demo "$@"
