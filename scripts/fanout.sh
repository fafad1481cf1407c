#!/bin/bash
# Near + far fan-out against one backup, on loopback: alternates runs of
# `remus protect` to one backup and to a near and a far backup (every
# process on this machine), SECONDS each, ROUNDS rounds, and prints
# achieved Hz, output delay (seal to the near backup's ack), the
# primary's CPU per dirty page, and each far backup's committed epoch,
# merged epochs and wire bytes.
#
# usage: scripts/fanout.sh PAGES_PER_SEC SECONDS ROUNDS   (REMUS_BIN: the remus binary)
set -u
R=${REMUS_BIN:-${CARGO_TARGET_DIR:-target}/release/remus}
for round in $(seq "$3"); do
  for mode in single far; do
    D=$(mktemp -d)
    $R keygen --data-dir "$D" >/dev/null 2>&1
    $R backup --data-dir "$D" --listen 127.0.0.1:0 > "$D/near.out" 2>/dev/null &
    NP=$!
    $R backup --data-dir "$D" --listen 127.0.0.1:0 --store "$D/far-store" > "$D/far.out" 2>/dev/null &
    FP=$!
    for i in $(seq 50); do grep -q "listening on" "$D/near.out" "$D/far.out" 2>/dev/null && [ "$(cat "$D"/near.out "$D"/far.out | grep -c listening)" = 2 ] && break; sleep 0.1; done
    NA=$(head -1 "$D/near.out" | awk '{print $3}')
    FA=$(head -1 "$D/far.out" | awk '{print $3}')
    EXTRA=()
    [ $mode = far ] && EXTRA=(--far "$FA")
    $R protect --data-dir "$D" --backup "$NA" "${EXTRA[@]}" --seconds "$2" --pages-per-sec "$1" --json > "$D/sum.json" 2>/dev/null
    python3 - "$D/sum.json" $mode <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
far = ' '.join('far: committed %d, merged %d, wire %d' % (f['epochs_committed'], f['merged_epochs'], f['wire_bytes']) for f in s['far'])
print('%-6s %.1f Hz, output p50 %.1f ms p99 %.1f ms, primary %.1f us CPU per dirty page, %d epochs %s'
      % (sys.argv[2], s['hz'], s['commit_ms_p50'], s['commit_ms_p99'], 1e6 * s['cpu_seconds'] / max(s['dirty_pages'], 1), s['epochs'], far))
PY
    kill $NP $FP; wait $NP $FP 2>/dev/null
    rm -rf "$D"
  done
done
