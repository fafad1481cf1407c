#!/bin/bash
# A guest dirtying about three times what its link carries: `remus backup`
# on loopback, remus-relay with 20 ms one-way delay (40 ms RTT) before it,
# and `remus protect --max-rate-mbit 8 --fec off --memory-mib 16
# --pages-per-sec 4000 --seconds 30`, once with `[protect]
# release-first-copy = true` and once with false, alternated, ROUNDS
# times. Prints a line per run from its JSON summary: rate, output delay
# p50/p99, epochs released ahead, epochs the guest was held still in,
# peak RSS, when it was protected.
#
# usage: scripts/above-capacity.sh [ROUNDS]   (REMUS_BIN, REMUS_RELAY_BIN: the binaries;
#        MODES: default "true false")
set -u
T=${CARGO_TARGET_DIR:-target}/release
R=${REMUS_BIN:-$T/remus}
RELAY=${REMUS_RELAY_BIN:-$T/remus-relay}
source "$(dirname "$0")/backup-lib.sh"
for _ in $(seq "${1:-2}"); do
  for mode in ${MODES:-true false}; do
    D=$(mktemp -d)
    start_backup "$R" "$D"
    mkfifo "$D/ctl"
    (sleep 90) > "$D/ctl" &
    "$RELAY" --to "$ADDR" --delay 20ms < "$D/ctl" > "$D/r.out" 2>"$D/r.err" &
    RP=$!
    for _ in $(seq 50); do [ -s "$D/r.out" ] && break; sleep 0.1; done
    printf '[protect]\nrelease-first-copy = %s\n' "$mode" > "$D/c.toml"
    "$R" --data-dir "$D" protect --config "$D/c.toml" --backup "$(head -1 "$D/r.out")" --max-rate-mbit 8 --fec off \
      --memory-mib 16 --pages-per-sec 4000 --seconds 30 --json > "$D/p.json" 2>"$D/p.err"
    kill "$BP" "$RP" 2>/dev/null
    wait 2>/dev/null
    python3 - "$D/p.json" "$mode" <<'PY' || tail -3 "$D/p.err"
import json, sys
s = json.load(open(sys.argv[1]))
print(f"release-first-copy={sys.argv[2]}: {s['hz']:.1f} Hz, output p50 {s['output_ms_p50']:.0f} ms p99 {s['output_ms_p99']:.0f} ms, "
      f"{s['released_ahead_epochs']} released ahead, held still in {s['throttled_epochs']} of {s['epochs']}, "
      f"peak RSS {s['peak_resident_mib']:.0f} MiB, protected after {s['protected_ms'] or 0:.0f} ms")
PY
    rm -rf "$D"
  done
done
