#!/usr/bin/env python3
"""Output delay of a `remus protect` run, whole and after its first seconds.

Usage: wan-steady.py RUNDIR [SKIP_SECONDS]

RUNDIR holds `protect.err`, the primary's log with RUST_LOG including
`remus_node=debug` (one "epoch acknowledged ... held_ms=..." line per epoch),
and `protect.json`, its `--json` summary. Prints p50 and p99 of the held
time (seal to acknowledgement) over the whole run and after the first
SKIP_SECONDS (default 2), the largest after them, the parity bytes and the
epoch rate.
"""
import datetime
import json
import re
import sys


def stamp(s):
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def main():
    run = sys.argv[1]
    skip = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
    rows = []
    with open(run + "/protect.err") as log:
        for line in log:
            m = re.search(r"^(\S+).*epoch=(\d+) held_ms=([\d.]+)", line)
            if m:
                rows.append((stamp(m.group(1)), float(m.group(3))))
    if not rows:
        sys.exit(f"{run}/protect.err has no 'epoch acknowledged' lines: run with RUST_LOG=remus_node=debug")
    start = rows[0][0]
    whole = [h for _, h in rows]
    steady = [h for t, h in rows if t - start >= skip] or whole
    with open(run + "/protect.json") as f:
        summary = json.load(f)
    print(
        f"all p50 {pct(whole, .5):.0f} p99 {pct(whole, .99):.0f} | after {skip:g} s: "
        f"p50 {pct(steady, .5):.0f} p99 {pct(steady, .99):.0f} max {max(steady):.0f} | "
        f"parity B {summary.get('parity_bytes', 0)} hz {summary['hz']:.1f}"
    )


if __name__ == "__main__":
    main()
