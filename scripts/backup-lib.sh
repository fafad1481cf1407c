# Sourced by the measurement scripts: one way to start a local backup.
#
# start_backup REMUS DIR [PREFIX...]: TLS material in DIR (keygen), then
# `REMUS backup` on loopback, started under PREFIX when given (such as
# `taskset -c 0`), its stdout and stderr in DIR/b.out and DIR/b.err. Sets
# BP (its pid) and ADDR (where it listens) once it says it listens.
# BACKUP_CONFIG, when set, is passed as its --config.
start_backup() {
  local remus=$1 dir=$2
  shift 2
  local config=()
  [ -n "${BACKUP_CONFIG:-}" ] && config=(--config "$BACKUP_CONFIG")
  "$remus" --data-dir "$dir" keygen >/dev/null 2>&1
  "$@" "$remus" "${config[@]}" --data-dir "$dir" backup --listen 127.0.0.1:0 > "$dir/b.out" 2>"$dir/b.err" &
  BP=$!
  for _ in $(seq 50); do grep -q "listening on" "$dir/b.out" 2>/dev/null && break; sleep 0.1; done
  ADDR=$(head -1 "$dir/b.out" | awk '{print $3}')
}
