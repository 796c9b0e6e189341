#!/usr/bin/env bash
# Runs every test of the workspace.
#
#   scripts/test.sh [cargo test args...]
#
# With no servers configured everything runs on SQLite, file:// and memory://. The same
# suites also run on Postgres when PATCHPORT_TEST_DATABASE_URL is set (a fresh database per
# test, e.g. postgres://postgres@127.0.0.1:5432/test) and on an S3-compatible server when
# PATCHPORT_TEST_S3_ENDPOINT is set (see scripts/s3-server.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PATCHPORT_TEST_DATABASE_URL:-}" ]; then
  echo "postgres tests: on (${PATCHPORT_TEST_DATABASE_URL%%\?*})"
  # Drop the per-test databases of earlier runs (best effort).
  if command -v psql >/dev/null 2>&1; then
    psql "$PATCHPORT_TEST_DATABASE_URL" -Atc \
      "SELECT datname FROM pg_database WHERE datname LIKE 'pp\_test\_%'" 2>/dev/null |
      while read -r db; do
        psql "$PATCHPORT_TEST_DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$db\"" >/dev/null 2>&1 || true
      done
  fi
else
  echo "postgres tests skipped: PATCHPORT_TEST_DATABASE_URL not set (SQLite only)"
fi
if [ -n "${PATCHPORT_TEST_S3_ENDPOINT:-}" ]; then
  echo "S3 tests: on (${PATCHPORT_TEST_S3_ENDPOINT}, bucket ${PATCHPORT_TEST_S3_BUCKET:-patchport-test})"
else
  echo "S3 tests skipped: PATCHPORT_TEST_S3_ENDPOINT not set (file:// and memory:// only)"
fi

status=0
cargo test --workspace --locked --no-fail-fast "$@" || status=$?

# Tests #[ignore]d because they need a backend this machine may lack (cargo test reports
# them ignored, with the reason): run here when it is configured, else say why not. The
# same --workspace selection as above, so nothing is built again.
ignored() { # ignored TEST-TARGET WHY-NOT (empty WHY-NOT: run)
  if [ -z "$2" ]; then
    cargo test --workspace --locked --no-fail-fast --test "$1" -- --ignored || status=$?
  else
    echo "tests/$1: ignored tests skipped: $2"
  fi
}
if [ "$#" -eq 0 ]; then
  pg="${PATCHPORT_TEST_DATABASE_URL:+yes}"
  s3="${PATCHPORT_TEST_S3_ENDPOINT:+yes}"
  ignored replicas "$([ -n "$pg" ] && [ -n "$s3" ] || echo "two replicas need PATCHPORT_TEST_DATABASE_URL and PATCHPORT_TEST_S3_ENDPOINT")"
  ignored outbox "$([ -n "$pg" ] || echo "PATCHPORT_TEST_DATABASE_URL not set")"
  local_pg=""
  if [ -n "${PATCHPORT_TEST_PG_BIN:-}" ] || compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" > /dev/null; then
    if [ "$(id -u)" != 0 ] || id postgres > /dev/null 2>&1; then local_pg=yes; fi
  fi
  ignored faults "$([ -n "$local_pg" ] || echo "no local PostgreSQL installation to run a private server (initdb, pg_ctl; as root, a postgres user)")"
else
  echo "ignored (backend-bound) tests not run: cargo test arguments given (add -- --ignored to run them)"
fi

# The Python SDK (clients/python) against the debug binary just built, in a venv cached
# under ~/.cache/patchport-py; skipped with the reason when the venv cannot be made.
if [ "$#" -eq 0 ]; then
  clients/python/scripts/test.sh || status=$?
else
  echo "python tests skipped: cargo test arguments given"
fi
exit "$status"
