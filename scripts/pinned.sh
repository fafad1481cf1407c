#!/bin/bash
# Primary and backup each pinned to one core of this machine (backup on
# CPU 0, primary and its arena guest on CPU 1), on loopback: one run of
# `remus protect --pages-per-sec N` for SECONDS, printing achieved Hz,
# output delay and CPU per dirty page on each side.
#
# usage: scripts/pinned.sh PAGES_PER_SEC SECONDS   (REMUS_BIN: the remus binary)
set -u
R=${REMUS_BIN:-${CARGO_TARGET_DIR:-target}/release/remus}
D=$(mktemp -d)
source "$(dirname "$0")/backup-lib.sh"
start_backup $R $D taskset -c 0
T0=$(awk '{print $14+$15}' /proc/$BP/stat)
taskset -c 1 $R --data-dir $D protect --backup $ADDR --seconds $2 --pages-per-sec $1 --json --drain-seconds 30 > $D/p.json 2>$D/p.err
T1=$(awk '{print $14+$15}' /proc/$BP/stat)
kill $BP; wait $BP 2>/dev/null
python3 - "$D/p.json" "$1" $((T1-T0)) <<'PY'
import json,sys
s=json.load(open(sys.argv[1]))
d=max(s["dirty_pages"],1)
tick=100.0
print(f'{sys.argv[2]:>6} pages/s: {s["hz"]:.1f} Hz, pause p50 {s["pause_ms_p50"]:.2f} p99 {s["pause_ms_p99"]:.2f} ms, acked {s["epochs_committed"]}/{s["epochs"]}, output p50 {s["commit_ms_p50"]:.0f} ms p99 {s["commit_ms_p99"]:.0f} ms, dirty {s["dirty_pages"]}, primary {s["cpu_seconds"]*1e6/d:.1f} us/page (guest {s.get("guest_cpu_seconds",0)*1e6/d:.1f}), backup {int(sys.argv[3])/tick*1e6/d:.1f} us/page')
PY
rm -rf $D
