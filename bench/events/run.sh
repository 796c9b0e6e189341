#!/usr/bin/env bash
# Events latency benchmark: commit-to-subscriber latency of EventService.Subscribe with
# 1, 10 and 100 subscribers, against `patchport serve --workers 0` (a separate process)
# on a fresh SQLite directory and on a fresh Postgres database. The measuring program is
# tests/examples/events.rs; it uses only the public gRPC API. A measurement, not a test;
# exits 1 when any run lost or duplicated an event or failed, after printing the table.
# The last column is the CPU time the registry process used during the run (pushes and
# event streams; Postgres's own processes not included).
#
#   bench/events/run.sh [EVENTS=200] [INTERVAL_MS=20] [SUBSCRIBER_COUNTS="1 10 100"] [STORES="sqlite postgres"]
#
# Needs a Postgres server that lets user postgres create databases without a password
# ($PGHOST default 127.0.0.1, $PGPORT 5432, $PGUSER postgres); the database is created
# with psql and dropped afterwards. Blobs (and the SQLite file) go under $BENCH_WORK
# (default /tmp/patchport-events-bench), removed afterwards. Loopback only; the program,
# the registry and Postgres share this machine's cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
events="${1:-200}"
interval_ms="${2:-20}"
counts="${3:-1 10 100}"
stores="${4:-sqlite postgres}"
export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-postgres}"
work="${BENCH_WORK:-/tmp/patchport-events-bench}"
target="${CARGO_TARGET_DIR:-target}"
# The registry runs without auth (no push rate limit) and the program without a token.
unset PATCHPORT_ADMIN_TOKEN PATCHPORT_AUTH PATCHPORT_TOKEN PATCHPORT_REGISTRY

cargo build --release --locked -p patchport --bin patchport >&2
cargo build --release --locked -p patchport-tests --example events >&2
bin="$target/release/patchport"
bench="$target/release/examples/events"

db="patchport_events_$$"
server=""
stop_server() {
  if [ -n "$server" ]; then
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    server=""
  fi
}
watcher=""
stop_watcher() {
  if [ -n "$watcher" ]; then
    kill "$watcher" 2>/dev/null || true
    wait "$watcher" 2>/dev/null || true
    watcher=""
  fi
}
cleanup() {
  stop_watcher
  stop_server
  psql -q -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# start_server STORE: a fresh store and `patchport serve` on a free port; sets $url.
start_server() {
  local store="$1" database addr
  rm -rf "$work"
  mkdir -p "$work/blobs"
  case "$store" in
    sqlite) database="sqlite://$work/registry.db" ;;
    postgres)
      psql -q -v ON_ERROR_STOP=1 -d postgres -c "CREATE DATABASE $db" >/dev/null
      database="postgres://$PGUSER@$PGHOST:$PGPORT/$db"
      ;;
    *) echo "unknown store $store (sqlite or postgres)" >&2; exit 2 ;;
  esac
  # Port 0: the registry prints the address it bound.
  # Auth is off: the 100 subscribers are one anonymous caller (127.0.0.1), so the
  # per-caller subscription cap is raised above them (by variable: older builds ignore it).
  PATCHPORT_MAX_SUBSCRIPTIONS=1024 "$bin" serve --listen 127.0.0.1:0 --workers 0 \
    --database "$database" --blobs "file://$work/blobs" > "$work/serve.log" 2>&1 &
  server=$!
  for _ in $(seq 1 300); do
    grep -qs "registry listening on" "$work/serve.log" && break
    kill -0 "$server" 2>/dev/null || break
    sleep 0.1
  done
  addr=$(sed -n 's/^patchport registry listening on \([0-9.:]*\).*/\1/p' "$work/serve.log" | head -1)
  if [ -z "$addr" ]; then
    cat "$work/serve.log" >&2
    exit 1
  fi
  url="http://$addr"
}

# Postgres streams an event only once every transaction that started before it has
# ended, in the whole cluster (the reader stops at pg_snapshot_xmin), so a long
# transaction in another database on a shared server delays delivery. While a Postgres
# run lasts, this samples the age of the oldest transaction holding an xid outside the
# benchmark's database every 0.2 s into $1.
watch_xids() {
  while :; do
    psql -XAtq -d postgres -c "SELECT coalesce(round(max(extract(epoch FROM clock_timestamp() - xact_start))::numeric, 2), 0) FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND datname IS DISTINCT FROM '$db'" >> "$1" 2>/dev/null || true
    sleep 0.2
  done
}

# CPU time (user + system, clock ticks) the registry process has used so far.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$server/stat"; }

echo "events benchmark: $events events per run, one every $interval_ms ms; subscribers: $counts; stores: $stores"
echo "$(nproc) cores; uptime before: $(uptime)"
rows=()
failed=0
for store in $stores; do
  start_server "$store"
  echo "$store: patchport serve --workers 0 on $url ($("$bin" --version 2>/dev/null || echo patchport))"
  for n in $counts; do
    cpu_before=$(cpu_ticks)
    if [ "$store" = postgres ]; then
      : > "$work/xids"
      watch_xids "$work/xids" &
      watcher=$!
    fi
    row=$(timeout 600 "$bench" --registry "$url" --store "$store" --subscribers "$n" \
      --events "$events" --interval-ms "$interval_ms" --row-only) || failed=1
    if [ "$store" = postgres ]; then
      stop_watcher
      echo "postgres: the oldest transaction of another database seen during the run was $(sort -n "$work/xids" | tail -1) s old (events wait for it)" >&2
    fi
    [ -n "$row" ] || row="| $store | $n | failed | | | | | |"
    cpu=$(awk -v a="$cpu_before" -v b="$(cpu_ticks)" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", (b - a) / hz }')
    row="$row $cpu |"
    echo "$row"
    rows+=("$row")
  done
  stop_server
  if [ "$store" = postgres ]; then
    psql -q -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null
  fi
done
echo "uptime after: $(uptime)"
echo
echo "| store | subscribers | events | p50 ms | p99 ms | max ms | lost | duplicates | registry CPU s |"
echo "|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
exit "$failed"
