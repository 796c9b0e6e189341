#!/usr/bin/env bash
# Starts a local S3-compatible server (moto) for the blob store's S3 conformance tests.
#
#   eval "$(scripts/s3-server.sh [PORT])"      # default port 9000
#   cargo test -p patchport-store --test blobs
#
# Installs moto[server] into a venv under ${PATCHPORT_TOOLS_DIR:-$HOME/.cache/patchport-tools}
# on first use (PyPI only), starts it on 127.0.0.1:PORT in the background (unless a server
# already answers there), creates the bucket ${PATCHPORT_TEST_S3_BUCKET:-patchport-test},
# and prints the `export` lines the tests read. Everything else goes to stderr, so the
# output can be `eval`ed. Stop it with: kill "$(cat "$TOOLS_DIR/moto-PORT.pid")".
set -euo pipefail

port="${1:-9000}"
bucket="${PATCHPORT_TEST_S3_BUCKET:-patchport-test}"
tools_dir="${PATCHPORT_TOOLS_DIR:-$HOME/.cache/patchport-tools}"
venv="$tools_dir/moto-venv"
moto_version="${PATCHPORT_MOTO_VERSION:-5.2.5}"
endpoint="http://127.0.0.1:$port"
pid_file="$tools_dir/moto-$port.pid"
log_file="$tools_dir/moto-$port.log"

log() { printf 's3-server: %s\n' "$*" >&2; }

case "$port" in
  '' | *[!0-9]*) log "port must be a number, got '$port'"; exit 2 ;;
esac

mkdir -p "$tools_dir"

if [ ! -x "$venv/bin/moto_server" ]; then
  log "installing moto[server]==$moto_version into $venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "moto[server]==$moto_version" >&2
fi

# Prints the HTTP status of a request, or 000 when nothing answers.
http_status() {
  "$venv/bin/python" - "$@" <<'PY'
import sys, urllib.request, urllib.error
method, url = sys.argv[1], sys.argv[2]
req = urllib.request.Request(url, method=method, data=b"" if method == "PUT" else None)
try:
    with urllib.request.urlopen(req, timeout=2) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
PY
}

if [ "$(http_status GET "$endpoint/")" = "000" ]; then
  log "starting moto_server on 127.0.0.1:$port (log: $log_file)"
  nohup "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$log_file" 2>&1 &
  echo $! >"$pid_file"
  for _ in $(seq 1 100); do
    [ "$(http_status GET "$endpoint/")" != "000" ] && break
    if ! kill -0 "$(cat "$pid_file")" 2>/dev/null; then
      log "moto_server exited; last lines of its log:"
      tail -n 20 "$log_file" >&2
      exit 1
    fi
    sleep 0.2
  done
  if [ "$(http_status GET "$endpoint/")" = "000" ]; then
    log "moto_server did not answer on $endpoint within 20 s"
    exit 1
  fi
else
  log "a server already answers on $endpoint; reusing it"
fi

# moto accepts any credentials; create the bucket (200 when new, 409 when it exists).
status="$(http_status PUT "$endpoint/$bucket")"
case "$status" in
  200 | 409) log "bucket '$bucket' ready" ;;
  *) log "creating bucket '$bucket' failed with HTTP $status"; exit 1 ;;
esac

cat <<EOF
export PATCHPORT_TEST_S3_ENDPOINT=$endpoint
export PATCHPORT_TEST_S3_BUCKET=$bucket
export AWS_ENDPOINT_URL=$endpoint
export AWS_ACCESS_KEY_ID=patchport-test
export AWS_SECRET_ACCESS_KEY=patchport-test
export AWS_REGION=us-east-1
export AWS_ALLOW_HTTP=true
EOF
