#!/bin/bash
# A 5 s partition of the link, then healing: `remus backup`, remus-relay
# (one-way delay RTT/2, ±1 ms jitter, LOSS) and `remus protect` (default
# workload, 25 s) on loopback; the relay is cut 10 s after it starts and
# healed 5 s later. Prints how long after healing the primary was
# connected again and its output released within 300 ms again (and that
# after connecting: the catch-up), and the longest an output waited.
#
# usage: scripts/partition.sh RTT_MS LOSS   (REMUS_BIN, REMUS_RELAY_BIN: the binaries;
#        REMUS_CONFIG: a configuration file for the primary)
set -u
T=${CARGO_TARGET_DIR:-target}/release
R=${REMUS_BIN:-$T/remus}
RELAY=${REMUS_RELAY_BIN:-$T/remus-relay}
D=$(mktemp -d)
trap 'rm -rf $D' EXIT
source "$(dirname "$0")/backup-lib.sh"
start_backup $R $D
mkfifo $D/ctl
( sleep 10; echo partition; sleep 5; date -u +%Y-%m-%dT%H:%M:%S.%N > $D/heal; echo heal; sleep 30 ) > $D/ctl &
$RELAY --to $ADDR --delay $(( $1 / 2 ))ms --jitter 1ms --loss $2 < $D/ctl > $D/r.out 2>$D/r.err &
RP=$!
for i in $(seq 50); do [ -s $D/r.out ] && break; sleep 0.1; done
RUST_LOG=info,remus_node=debug $R --data-dir $D protect --backup $(head -1 $D/r.out) ${REMUS_CONFIG:+--config $REMUS_CONFIG} --seconds 25 --json > $D/p.json 2>$D/p.err
kill $BP $RP 2>/dev/null
wait 2>/dev/null
python3 - $D/p.err $D/heal <<'PY'
import datetime, re, sys
lines = open(sys.argv[1]).read().splitlines()
heal = datetime.datetime.fromisoformat(open(sys.argv[2]).read().strip()[:26])
at = lambda l: datetime.datetime.fromisoformat(l[:26])
again = [at(l) for l in lines if 'connected to backup' in l and at(l) > heal][0]
acks = [(at(l), float(m.group(1))) for l in lines for m in [re.search(r'epoch acknowledged .*held_ms=([\d.]+)', l)] if m]
normal = next(t for t, held in acks if t > again and held < 300)
print(f'connected {(again - heal).total_seconds():.2f} s after healing; output within 300 ms again after {(normal - heal).total_seconds():.2f} s '
      f'({(normal - again).total_seconds():.2f} s after connecting); longest held {max(h for _, h in acks) / 1e3:.1f} s')
PY
