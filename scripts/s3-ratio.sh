#!/bin/bash
# The S3 tier's bytes against the wire bytes: a backup with an `[s3]`
# table (uploading every 2 s) against a local moto_server (scripts/
# s3-server.sh), pinned to CPU 0, and `remus protect --pages-per-sec
# PAGES --seconds SECS` (default 20000, 10) pinned to CPU 1; once the
# last epoch is uploaded, the bucket's objects are summed by kind (packs,
# segments, indexes, ...) against the wire bytes and the local packs;
# then the newest epoch is restored from S3 alone, RESTORES times (3),
# and the whole tier verified (`verify --s3`), VERIFIES times (1) by each
# binary of REMUS_VERIFY_BIN.
#
# usage: scripts/s3-ratio.sh   (REMUS_BIN, REMUS_RESTORE_BIN,
#        REMUS_VERIFY_BIN: the binaries; PAGES, SECS, RESTORES, VERIFIES
#        in the environment)
set -u
R=${REMUS_BIN:-${CARGO_TARGET_DIR:-target}/release/remus}
source "$(dirname "$0")/s3-server.sh"
source "$(dirname "$0")/backup-lib.sh"
set +e
PY=${REMUS_VENV:-$HOME/.cache/remus-venv}/bin/python
BUCKET=ratio
$PY - "$REMUS_TEST_S3_ENDPOINT" "$BUCKET" <<'PY'
import sys, boto3
boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id='test', aws_secret_access_key='test',
             region_name='us-east-1').create_bucket(Bucket=sys.argv[2])
PY
D=$(mktemp -d)
cat > "$D/c.toml" <<T
[s3]
bucket = "$BUCKET"
prefix = "ratio"
endpoint = "$REMUS_TEST_S3_ENDPOINT"
region = "us-east-1"
force-path-style = true
upload-interval-ms = 2000
access-key-id = "test"
secret-access-key = "test"
T
BACKUP_CONFIG="$D/c.toml" start_backup "$R" "$D" taskset -c 0
taskset -c 1 "$R" --data-dir "$D" protect --backup "$ADDR" --seconds "${SECS:-10}" --pages-per-sec "${PAGES:-20000}" --json --drain-seconds 30 > "$D/p.json" 2>"$D/p.err"
LAST=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['epochs_committed'])" "$D/p.json")
echo "waiting for epoch $LAST to be uploaded" >&2
AT=$(grep -o "uploaded guest-.* epoch [0-9]*" "$D/b.out" | tail -1 | grep -o "[0-9]*$")
T0=$(date +%s)
for _ in $(seq 1800); do grep -q "uploaded guest-.* epoch $LAST\$" "$D/b.out" && break; sleep 1; done
echo "S3 upload caught up $(( $(date +%s) - T0 )) s after the run (epoch ${AT:-0} of $LAST uploaded when it ended)"
kill $BP; wait $BP 2>/dev/null
$PY - "$D/p.json" "$REMUS_TEST_S3_ENDPOINT" "$BUCKET" "$(du -sb "$D/store/packs" | cut -f1)" <<'PY'
import collections, json, sys, boto3
s = json.load(open(sys.argv[1]))
c = boto3.client('s3', endpoint_url=sys.argv[2], aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1')
by = collections.Counter()
for page in c.get_paginator('list_objects_v2').paginate(Bucket=sys.argv[3]):
    for o in page.get('Contents', []):
        parts = o['Key'].split('/')
        by[parts[1] if len(parts) > 2 else parts[-1]] += o['Size']
w = s['wire_bytes']
t = sum(by.values())
print(f"wire {w/1e6:.0f} MB, local packs {int(sys.argv[4])/w:.2f}x, S3 tier {t/1e6:.0f} MB = {t/w:.2f}x ("
      + ", ".join(f"{k} {v/w:.3f}x" for k, v in by.most_common()) + ")")
PY
# A restore of the newest epoch from S3 alone, three times (RESTORES).
RR=${REMUS_RESTORE_BIN:-$(dirname "$R")/remus-restore}
for _ in $(seq "${RESTORES:-3}"); do
  T0=$(date +%s.%N)
  "$RR" --from "s3://$BUCKET/ratio" --config "$D/c.toml" --latest --to "$D/r.img" >/dev/null 2>"$D/r.err" || { cat "$D/r.err"; break; }
  echo "restore of the newest epoch from S3: $(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$T0" "$(date +%s.%N)") s"
  rm -f "$D/r.img"
done
# `verify --s3` of the whole tier, VERIFIES times (default 1) by each of
# REMUS_VERIFY_BIN (binaries separated by spaces, alternated; default
# REMUS_BIN).
for _ in $(seq "${VERIFIES:-1}"); do
  for VB in ${REMUS_VERIFY_BIN:-$R}; do
    T0=$(date +%s.%N)
    "$VB" --data-dir "$D" --config "$D/c.toml" verify --s3 >"$D/v.out" 2>&1 || { tail -5 "$D/v.out"; break; }
    echo "verify --s3 ($VB): $(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$T0" "$(date +%s.%N)") s, $(tail -1 "$D/v.out")"
  done
done
rm -rf "$D"
