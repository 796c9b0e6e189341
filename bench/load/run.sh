#!/usr/bin/env bash
# Load benchmark: one `patchport serve` on a fresh Postgres database, loaded by the
# generator (tests/examples/load.rs) with concurrent pushes, pulls, compat queries and
# subscribers. A measurement, not a test; it fails (exit 1) on any error or lost event.
#
#   bench/load/run.sh [CLIENTS] [SECONDS] [extra generator args...]   # default 64 60
#
# Needs a Postgres server that lets user postgres create databases without a password
# ($PGHOST default 127.0.0.1, $PGPORT 5432, $PGUSER postgres). Blobs go to file:// under
# $BENCH_WORK (default /tmp/patchport-load-bench). The database is dropped afterwards.
# The generator and the registry run on the same machine and share its cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
clients="${1:-64}"
seconds="${2:-60}"
shift $(( $# < 2 ? $# : 2 ))
export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-postgres}"
work="${BENCH_WORK:-/tmp/patchport-load-bench}"
target="${CARGO_TARGET_DIR:-target}"

cargo build --release --locked -p patchport --bin patchport >&2
cargo build --release --locked -p patchport-tests --example load >&2
bin="$target/release/patchport"
load="$target/release/examples/load"

db="patchport_load_$$"
createdb "$db"
rm -rf "$work"
mkdir -p "$work/blobs"
port=$((20000 + RANDOM % 20000))
# Auth is off: every client is the one anonymous caller 127.0.0.1, so the per-caller
# stream caps are raised above the client count (by variable: older builds ignore it).
PATCHPORT_MAX_UPLOAD_STREAMS=1024 PATCHPORT_MAX_SUBSCRIPTIONS=1024 \
  "$bin" serve --listen "127.0.0.1:$port" --workers 0 \
  --database "postgres://$PGUSER@$PGHOST:$PGPORT/$db" \
  --blobs "file://$work/blobs" > "$work/serve.log" 2>&1 &
server=$!
cleanup() {
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  dropdb --if-exists "$db" || true
}
trap cleanup EXIT
for _ in $(seq 1 200); do grep -q listening "$work/serve.log" && break; sleep 0.1; done
grep -q listening "$work/serve.log" || { cat "$work/serve.log" >&2; exit 1; }

echo "registry: patchport serve --workers 0, Postgres database $db, blobs under $work/blobs"
"$load" --registry "http://127.0.0.1:$port" --clients "$clients" --seconds "$seconds" "$@"
