#!/bin/bash
# Store bytes against wire bytes: for each remus binary given (default:
# the build's), three rounds alternated, a backup pinned to CPU 0 and
# `remus protect --pages-per-sec PAGES --seconds SECS` (default 20000,
# 20) pinned to CPU 1; the backup is stopped cleanly and its store sized
# (packs, SST, blob files, WAL) against the wire bytes. Prints output
# delay and CPU per dirty page on each side too.
#
# usage: scripts/store-ratio.sh [BINARY...]   (PAGES, SECS, ROUNDS in the environment)
set -u
source "$(dirname "$0")/backup-lib.sh"
BINS=("$@")
[ ${#BINS[@]} -eq 0 ] && BINS=("${CARGO_TARGET_DIR:-target}/release/remus")
for round in $(seq "${ROUNDS:-3}"); do
  for R in "${BINS[@]}"; do
    D=$(mktemp -d)
    start_backup "$R" "$D" taskset -c 0
    T0=$(awk '{print $14+$15}' /proc/$BP/stat)
    taskset -c 1 "$R" --data-dir "$D" protect --backup "$ADDR" --seconds "${SECS:-20}" --pages-per-sec "${PAGES:-20000}" --json --drain-seconds 30 > "$D/p.json" 2>"$D/p.err"
    T1=$(awk '{print $14+$15}' /proc/$BP/stat)
    kill $BP; wait $BP 2>/dev/null
    S=$D/store
    size() { find "$S" -name "$1" -printf "%s\n" | awk '{s+=$1} END {print s+0}'; }
    python3 - "$D/p.json" "$R" $((T1-T0)) "$(du -sb "$S/packs" | cut -f1)" "$(size '*.sst')" "$(size '*.blob')" "$(size '*.log')" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
d = max(s["dirty_pages"], 1)
pk, sst, bl, lg = map(int, sys.argv[4:8])
w = s["wire_bytes"]
t = pk + sst + bl + lg
print(f'{sys.argv[2]}: {s["hz"]:.1f} Hz, output p50 {s["commit_ms_p50"]:.0f} ms p99 {s["commit_ms_p99"]:.0f} ms, '
      f'primary {s["cpu_seconds"]*1e6/d:.1f} us/page, backup {int(sys.argv[3])/100*1e6/d:.1f} us/page; '
      f'wire {w/1e6:.0f} MB, store {t/1e6:.0f} MB = {t/w:.2f}x (packs {pk/w:.2f}x, sst {sst/w:.2f}x, blobs {bl/w:.2f}x, wal {lg/w:.2f}x)')
PY
    rm -rf "$D"
  done
done
