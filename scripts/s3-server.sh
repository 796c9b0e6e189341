#!/usr/bin/env bash
# Starts a local S3-compatible server for the blob store's S3 conformance tests and the
# transfer bench: moto (Python, the default) or s3s-fs (Rust, files on disk, much faster).
#
#   eval "$(scripts/s3-server.sh [PORT])"                          # moto, default port 9000
#   eval "$(PATCHPORT_S3_SERVER=s3s scripts/s3-server.sh [PORT])"  # s3s-fs
#   cargo test -p patchport-store --test blobs
#
# Installs the server under ${PATCHPORT_TOOLS_DIR:-$HOME/.cache/patchport-tools} on first
# use (moto[server] into a venv, from PyPI; s3s-fs with `cargo install --locked`, from
# crates.io), starts it on 127.0.0.1:PORT in the background (unless a server already
# answers there), creates the bucket ${PATCHPORT_TEST_S3_BUCKET:-patchport-test}, and
# prints the `export` lines the tests read. Everything else goes to stderr, so the output
# can be `eval`ed. Both start empty: moto keeps objects in memory, and s3s-fs's data
# directory ($TOOLS_DIR/s3s-data-PORT) is emptied when the script starts it.
# Stop it with: kill "$(cat "$TOOLS_DIR/moto-PORT.pid")" (or s3s-PORT.pid).
#
# s3s-fs (0.14.1; later versions need a newer Rust) is a test server: it accepts
# multipart uploads and `x-amz-checksum-sha256` part headers, but neither checks nor
# returns a part's SHA-256, and its completion does not compare the listed ETags with
# the stored parts (AWS does both).
set -euo pipefail

port="${1:-9000}"
bucket="${PATCHPORT_TEST_S3_BUCKET:-patchport-test}"
tools_dir="${PATCHPORT_TOOLS_DIR:-$HOME/.cache/patchport-tools}"
server="${PATCHPORT_S3_SERVER:-moto}"
venv="$tools_dir/moto-venv"
moto_version="${PATCHPORT_MOTO_VERSION:-5.2.5}"
s3s_version="${PATCHPORT_S3S_VERSION:-0.14.1}"
s3s_root="$tools_dir/s3s-fs-$s3s_version"
s3s_data="$tools_dir/s3s-data-$port"
endpoint="http://127.0.0.1:$port"
case "$server" in
  moto | s3s) ;;
  *) printf 's3-server: PATCHPORT_S3_SERVER must be moto or s3s, got %s\n' "'$server'" >&2; exit 2 ;;
esac
pid_file="$tools_dir/$server-$port.pid"
log_file="$tools_dir/$server-$port.log"

log() { printf 's3-server: %s\n' "$*" >&2; }

case "$port" in
  '' | *[!0-9]*) log "port must be a number, got '$port'"; exit 2 ;;
esac

mkdir -p "$tools_dir"

if [ "$server" = moto ] && [ ! -x "$venv/bin/moto_server" ]; then
  log "installing moto[server]==$moto_version into $venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "moto[server]==$moto_version" >&2
fi
if [ "$server" = s3s ] && [ ! -x "$s3s_root/bin/s3s-fs" ]; then
  log "installing s3s-fs $s3s_version into $s3s_root (cargo install, a few minutes)"
  cargo install s3s-fs --version "$s3s_version" --features binary --locked \
    --root "$s3s_root" >&2
fi

# Prints the HTTP status of a request, or 000 when nothing answers.
http_status() {
  python3 - "$@" <<'PY'
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
  log "starting $server on 127.0.0.1:$port (log: $log_file)"
  if [ "$server" = moto ]; then
    nohup "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$log_file" 2>&1 &
  else
    # A bucket is a directory of the data root.
    rm -rf "$s3s_data"
    mkdir -p "$s3s_data/$bucket"
    nohup "$s3s_root/bin/s3s-fs" --host 127.0.0.1 --port "$port" \
      --access-key patchport-test --secret-key patchport-test "$s3s_data" >"$log_file" 2>&1 &
  fi
  echo $! >"$pid_file"
  for _ in $(seq 1 100); do
    [ "$(http_status GET "$endpoint/")" != "000" ] && break
    if ! kill -0 "$(cat "$pid_file")" 2>/dev/null; then
      log "$server exited; last lines of its log:"
      tail -n 20 "$log_file" >&2
      exit 1
    fi
    sleep 0.2
  done
  if [ "$(http_status GET "$endpoint/")" = "000" ]; then
    log "$server did not answer on $endpoint within 20 s"
    exit 1
  fi
else
  log "a server already answers on $endpoint; reusing it"
fi

if [ "$server" = moto ]; then
  # moto accepts any credentials; create the bucket (200 when new, 409 when it exists).
  status="$(http_status PUT "$endpoint/$bucket")"
  case "$status" in
    200 | 409) log "bucket '$bucket' ready" ;;
    *) log "creating bucket '$bucket' failed with HTTP $status"; exit 1 ;;
  esac
else
  # s3s-fs checks signatures: the bucket is made as its directory.
  mkdir -p "$s3s_data/$bucket"
  log "bucket '$bucket' ready"
fi

cat <<EOF
export PATCHPORT_TEST_S3_ENDPOINT=$endpoint
export PATCHPORT_TEST_S3_BUCKET=$bucket
export AWS_ENDPOINT_URL=$endpoint
export AWS_ACCESS_KEY_ID=patchport-test
export AWS_SECRET_ACCESS_KEY=patchport-test
export AWS_REGION=us-east-1
export AWS_ALLOW_HTTP=true
EOF
