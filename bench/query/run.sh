#!/usr/bin/env bash
# Query benchmark at scale: a registry whose namespace holds PATCHES patch versions, each
# ported onto a new base version, queried by CLIENTS concurrent read-only clients for
# SECONDS (tests/examples/query.rs: compat by patch, compat by base, resolve, list).
# A measurement, not a test; it fails (exit 1) on any query error.
#
#   bench/query/run.sh [PATCHES] [CLIENTS] [SECONDS]        # default 100000 16 30
#   BEFORE_BIN=/path/to/older/patchport bench/query/run.sh   # the same, both binaries,
#                                                            # one after the other
#
# The registry itself pushes the base (llama-micro v1, then v2) and one real patch and
# ports it with its worker; the other PATCHES-1 patch versions and their ports are
# copies of those rows inserted straight into Postgres (pushing 100,000 patches through
# the API would take hours on this machine), so every row is one the registry could have
# written. Each binary gets its own fresh database. Needs a Postgres that lets user
# postgres create databases without a password ($PGHOST default 127.0.0.1, $PGPORT 5432,
# $PGUSER postgres); databases are dropped afterwards.
set -euo pipefail
cd "$(dirname "$0")/../.."
patches="${1:-100000}"
clients="${2:-16}"
seconds="${3:-30}"
export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-postgres}"
work="${BENCH_WORK:-/tmp/patchport-query-bench}"
target="${CARGO_TARGET_DIR:-target}"

cargo build --release --locked -p patchport --bin patchport >&2
cargo build --release --locked -p patchport-tests --example query >&2
query="$target/release/examples/query"
fixtures=tests/fixtures/llama-micro

server=""
dbs=()
cleanup() {
  [ -n "$server" ] && { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }
  for db in "${dbs[@]}"; do dropdb --if-exists "$db" || true; done
}
trap cleanup EXIT

# start BIN DB WORKERS: starts `patchport serve` on a free port; sets $server and $url.
start() {
  local bin="$1" db="$2" workers="$3" port=$((20000 + RANDOM % 20000))
  local log="$work/$db-$port.log"
  "$bin" serve --listen "127.0.0.1:$port" --workers "$workers" \
    --database "postgres://$PGUSER@$PGHOST:$PGPORT/$db" \
    --blobs "file://$work/$db" > "$log" 2>&1 &
  server=$!
  url="http://127.0.0.1:$port"
  for _ in $(seq 1 300); do grep -q listening "$log" && return 0; sleep 0.1; done
  cat "$log" >&2
  exit 1
}

stop() { kill "$server"; wait "$server" 2>/dev/null || true; server=""; }

# measure NAME BIN: seeds a fresh database with BIN's registry and queries it.
measure() {
  local label="$1" bin="$2" db="patchport_query_$$_$1"
  dbs+=("$db")
  createdb "$db"
  mkdir -p "$work/$db"
  start "$bin" "$db" 1
  export PATCHPORT_REGISTRY="$url"
  "$bin" base push "$fixtures/v1" --name bench/llama --version v1 >/dev/null
  "$bin" patch push "$fixtures/patches/lora-qv" --name bench/p0 --version 1 --base bench/llama:v1 >/dev/null
  "$bin" base push "$fixtures/v2" --name bench/llama --version v2 --parent v1 >/dev/null
  "$bin" request bench/p0:1 --base bench/llama:v2 --wait >/dev/null
  stop
  local t0=$SECONDS
  psql -q -v ON_ERROR_STOP=1 -d "$db" <<SQL
INSERT INTO patch_versions (name, version, digest, base_id, state, yank_reason, adapter_json,
  peft_type, tensor_count, total_size, eval_digest, created_at)
SELECT 'bench/p' || i, '1', 'sha256:' || md5(i::text) || md5((-i)::text), r.base_id, r.state,
  r.yank_reason, r.adapter_json, r.peft_type, r.tensor_count, r.total_size, r.eval_digest,
  r.created_at + i
FROM generate_series(1, $((patches - 1))) i, (SELECT * FROM patch_versions WHERE name = 'bench/p0') r;
INSERT INTO patch_files (version_id, path, digest, size)
SELECT v.id, f.path, f.digest, f.size
FROM patch_versions v, patch_files f, patch_versions r
WHERE r.name = 'bench/p0' AND f.version_id = r.id AND v.name LIKE 'bench/p%' AND v.id <> r.id;
INSERT INTO ports (patch_id, base_id, source_base_id, method_version, state, refusals_json,
  diagnostics_json, adapter_files_json, merged_files_json, attempts, error, queued_at,
  started_at, finished_at, job_id, evaluation_json)
SELECT v.id, t.base_id, t.source_base_id, t.method_version, t.state, t.refusals_json,
  t.diagnostics_json, t.adapter_files_json, t.merged_files_json, t.attempts, t.error,
  t.queued_at, t.started_at, t.finished_at, t.job_id, t.evaluation_json
FROM ports t JOIN patch_versions r ON r.id = t.patch_id, patch_versions v
WHERE r.name = 'bench/p0' AND v.name LIKE 'bench/p%' AND v.id <> r.id;
ANALYZE;
SQL
  local digest
  start "$bin" "$db" 0
  digest="$("$bin" status bench/llama:v2 --registry "$url" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["version"]["digest"])')"
  echo
  echo "## $label: $bin ($patches patch versions and ports seeded in $((SECONDS - t0)) s)"
  echo
  "$query" --registry "$url" --clients "$clients" --seconds "$seconds" \
    --patches $((patches - 1)) --base bench/llama:v2 --base-digest "$digest" ||
    failed="$failed $label"
  stop
}

rm -rf "$work"
mkdir -p "$work"
echo "query bench: $patches patch versions, $clients clients, ${seconds}s per binary, Postgres $PGHOST:$PGPORT"
failed=""
if [ -n "${BEFORE_BIN:-}" ]; then
  measure before "$BEFORE_BIN"
fi
measure after "$target/release/patchport"
if [ -n "$failed" ]; then
  echo "queries failed:$failed" >&2
  exit 1
fi
