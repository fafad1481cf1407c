#!/bin/bash
# One backup protecting N primaries at once (N-to-1), on loopback: the
# backup pinned to CPU 0, the N primaries (each with its arena guest,
# guest ids 1..N) sharing CPU 1, each writing TOTAL/N pages per second
# for SECONDS. Prints each primary's rate and output delay, and the
# backup's CPU per dirty page over all of them: against N = 1 at the same
# total, what the one store's serialised commits cost.
#
# usage: scripts/n-to-1.sh N TOTAL_PAGES_PER_SEC SECONDS   (REMUS_BIN: the remus binary)
set -u
R=${REMUS_BIN:-${CARGO_TARGET_DIR:-target}/release/remus}
N=$1
D=$(mktemp -d)
trap 'rm -rf $D' EXIT
source "$(dirname "$0")/backup-lib.sh"
start_backup $R $D taskset -c 0
T0=$(awk '{print $14+$15}' /proc/$BP/stat)
PIDS=()
for g in $(seq $N); do
  taskset -c 1 $R --data-dir $D protect --backup $ADDR --guest $g --seconds $3 --pages-per-sec $(( $2 / N )) --json \
    --drain-seconds 30 > $D/p$g.json 2>$D/p$g.err &
  PIDS+=($!)
done
wait "${PIDS[@]}"
T1=$(awk '{print $14+$15}' /proc/$BP/stat)
kill $BP; wait $BP 2>/dev/null
python3 - $((T1-T0)) $D/p*.json <<'PY'
import json, sys
backup_ticks, files = int(sys.argv[1]), sys.argv[2:]
dirty = 0
for f in files:
    s = json.load(open(f))
    dirty += s["dirty_pages"]
    print(f'  guest {f.rsplit("/p", 1)[1][:-5]}: {s["hz"]:.1f} Hz, acked {s["epochs_committed"]}/{s["epochs"]}, '
          f'output p50 {s["commit_ms_p50"]:.0f} ms p99 {s["commit_ms_p99"]:.0f} ms, dirty {s["dirty_pages"]}, '
          f'primary {s["cpu_seconds"] * 1e6 / max(s["dirty_pages"], 1):.1f} us/page')
print(f'{len(files)} primaries: dirty {dirty}, backup {backup_ticks / 100 * 1e6 / max(dirty, 1):.1f} us/page')
PY
