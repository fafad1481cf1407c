#!/usr/bin/env bash
# Starts a real S3 server for the tests: moto_server (PyPI `moto[server]`,
# which enforces conditional puts, versioning, Object Lock and multipart)
# on loopback on a free port, and exports its URL as
# REMUS_TEST_S3_ENDPOINT. Sourced by test.sh; the server stops when the
# sourcing shell exits. The virtualenv is created once, under
# $REMUS_VENV (default ~/.cache/remus-venv). Also exports the
# moto_server path as REMUS_TEST_MOTO_SERVER, for tests that start a
# server of their own (one that enforces credentials).
set -euo pipefail

REMUS_VENV="${REMUS_VENV:-$HOME/.cache/remus-venv}"
if [ ! -x "$REMUS_VENV/bin/moto_server" ]; then
  echo "installing moto[server] into $REMUS_VENV (about a minute, once)" >&2
  if ! python3 -m venv "$REMUS_VENV" 2>/dev/null; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$REMUS_VENV"
  fi
  "$REMUS_VENV/bin/pip" install -q 'moto[server]'
fi

s3_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
s3_log="$(mktemp -t remus-moto.XXXXXX.log)"
"$REMUS_VENV/bin/moto_server" -H 127.0.0.1 -p "$s3_port" >"$s3_log" 2>&1 &
s3_pid=$!
trap 'kill "$s3_pid" 2>/dev/null || true; wait "$s3_pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$s3_port/moto-api/')" 2>/dev/null; then
    break
  fi
  kill -0 "$s3_pid" 2>/dev/null || { cat "$s3_log" >&2; echo "moto_server exited" >&2; exit 1; }
  sleep 0.2
done
export REMUS_TEST_S3_ENDPOINT="http://127.0.0.1:$s3_port"
export REMUS_TEST_MOTO_SERVER="$REMUS_VENV/bin/moto_server"
echo "s3 test server: $REMUS_TEST_S3_ENDPOINT (moto_server pid $s3_pid, log $s3_log)" >&2
