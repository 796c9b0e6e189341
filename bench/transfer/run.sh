#!/usr/bin/env bash
# Push and pull throughput of one large safetensors file over loopback gRPC, against
# `sha256sum` of the same file (a ratio, from one run), on file:// and on S3 (a local
# moto server, and a local s3s-fs server). A measurement, not a test.
#
#   bench/transfer/run.sh [SIZE_MIB]        # default 2048 (2 GiB)
#
# Uses the release binary ($PATCHPORT_BIN, default $CARGO_TARGET_DIR/release/patchport,
# built if missing); with $PATCHPORT_BEFORE_BIN set, that binary is measured too, on the
# same file, and each row is shown before and after. $BENCH_BACKENDS picks the stores
# (default "file s3"): `s3` is moto and `s3s` is s3s-fs (Rust, objects as files), both
# started by scripts/s3-server.sh on port $BENCH_S3_PORT (default 9150), stopped and
# started again between runs so each starts empty. A registry on 127.0.0.1 with SQLite,
# everything under $BENCH_WORK (default /tmp/patchport-transfer-bench), and a fresh
# random file each run. The registry takes its other settings from the environment
# (`PATCHPORT_BLOB_READ_CONCURRENCY=4`, say; a binary without the setting ignores it).
#
# Where a push's time goes is read from the registry's JSON log: until the upload
# session of the big file starts (the client hashing the files), until its upload stream
# is persisted (sending and storing), until that upload is committed (verifying; on S3
# completing the multipart upload), until the version is published (the registry reading
# and indexing the safetensors file), and the rest. Binaries older than the "upload
# stream persisted" log line show "?" for the commit (then counted in the upload).
set -euo pipefail
cd "$(dirname "$0")/../.."
size_mib="${1:-2048}"
work="${BENCH_WORK:-/tmp/patchport-transfer-bench}"
target="${CARGO_TARGET_DIR:-target}"
bin="${PATCHPORT_BIN:-$target/release/patchport}"
before_bin="${PATCHPORT_BEFORE_BIN:-}"
backends="${BENCH_BACKENDS:-file s3}"
s3_port="${BENCH_S3_PORT:-9150}"
tools_dir="${PATCHPORT_TOOLS_DIR:-$HOME/.cache/patchport-tools}"
if [ ! -x "$bin" ]; then
  cargo build --release -p patchport >&2
fi
rm -rf "$work"
mkdir -p "$work/model"

# A valid safetensors file of one U8 tensor of (size - header) bytes, random content.
python3 - "$work/model/model.safetensors" "$size_mib" <<'PY'
import json, os, struct, sys
path, mib = sys.argv[1], int(sys.argv[2])
total = mib << 20
def header(n):
    h = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    return h + b" " * (-len(h) % 8)
n = total - 8 - len(header(total))
h = header(n)
with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h)
    block = os.urandom(16 << 20)
    left = n
    while left:
        k = min(left, len(block))
        f.write(block[:k])
        left -= k
PY
echo '{"model_type":"llama","hidden_size":64,"num_hidden_layers":1,"num_attention_heads":1,"vocab_size":8}' > "$work/model/config.json"
bytes=$(stat -c %s "$work/model/model.safetensors")

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }

# Nothing left to write back when a measurement starts (the file just made, an earlier
# run's blobs): else the first binary measured pays for it and the second does not.
sync
cat "$work/model/model.safetensors" > /dev/null   # warm the page cache
t0=$(now); sha256sum "$work/model/model.safetensors" > /dev/null; t1=$(now)
sha=$(secs "$t0" "$t1")

stop_s3() {
  local pid_file
  for pid_file in "$tools_dir/moto-$s3_port.pid" "$tools_dir/s3s-$s3_port.pid"; do
    [ -f "$pid_file" ] || continue
    kill "$(cat "$pid_file")" 2>/dev/null || true
    for _ in $(seq 1 50); do
      kill -0 "$(cat "$pid_file" 2>/dev/null)" 2>/dev/null || break
      sleep 0.1
    done
    rm -f "$pid_file"
  done
  rm -rf "$tools_dir/s3s-data-$s3_port"
}

server=
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null || true
  stop_s3
}
trap cleanup EXIT

# The phases of the push in a registry log, as "hash upload commit index rest" seconds.
phases() {
  python3 - "$1" "$2" "$3" "$bytes" <<'PY'
import datetime, json, sys
log, start, end, size = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
def ts(line):
    t = line["timestamp"].replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(t).timestamp()
session = flushed = committed = published = None
for raw in open(log):
    try:
        line = json.loads(raw)
    except ValueError:
        continue
    f = line.get("fields", {})
    msg, size_field = f.get("message"), str(f.get("size", ""))
    if msg == "upload session started" and size_field == size and session is None:
        session = ts(line)
    elif msg == "upload stream persisted" and size_field == size:
        flushed = ts(line)
    elif msg == "upload committed" and size_field == size:
        committed = ts(line)
    elif msg == "base version published":
        published = ts(line)
if None in (session, committed, published):
    print("? ? ? ? ?")
else:
    # Registries before the "upload stream persisted" line: upload and commit in one.
    stream, commit = (flushed - session, committed - flushed) if flushed else (committed - session, None)
    commit = "?" if commit is None else f"{commit:.1f}"
    print(f"{session - start:.1f} {stream:.1f} {commit} {published - committed:.1f} {end - published:.1f}")
PY
}

# One push and pull with binary $1 on backend $2; prints "push pull phases...".
measure() {
  local b="$1" backend="$2" run="$3" blobs
  local dir="$work/$run"
  mkdir -p "$dir"
  sync
  case "$backend" in
    file) blobs="file://$dir/blobs" ;;
    s3 | s3s)
      local server_kind=moto
      [ "$backend" = s3s ] && server_kind=s3s
      stop_s3
      eval "$(PATCHPORT_S3_SERVER=$server_kind PATCHPORT_TEST_S3_BUCKET=patchport-bench \
        scripts/s3-server.sh "$s3_port" 2>"$dir/s3-server.log")"
      blobs="s3://patchport-bench/$run"
      ;;
  esac
  local port=$((20000 + RANDOM % 20000))
  PATCHPORT_LOG_FORMAT=json PATCHPORT_LOG="info,patchport_store=debug" \
    "$b" serve --listen "127.0.0.1:$port" --database "sqlite://$dir/registry.db" \
    --blobs "$blobs" > "$dir/serve.log" 2>&1 &
  server=$!
  for _ in $(seq 1 100); do grep -q listening "$dir/serve.log" && break; sleep 0.1; done
  local url="http://127.0.0.1:$port"
  local t0 t1 t2 t3
  t0=$(now)
  PATCHPORT_REGISTRY="$url" "$b" base push "$work/model" --name bench/big --version v1 > /dev/null
  t1=$(now)
  sync
  t2=$(now)
  PATCHPORT_REGISTRY="$url" "$b" pull bench/big:v1 --out "$dir/pulled" > /dev/null
  t3=$(now)
  cmp "$work/model/model.safetensors" "$dir/pulled/model.safetensors"
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  server=
  echo "$(secs "$t0" "$t1") $(secs "$t2" "$t3") $(phases "$dir/serve.log" "$t0" "$t1")"
  rm -rf "$dir/pulled" "$dir/blobs"
  case "$backend" in s3 | s3s) stop_s3 ;; esac
  return 0
}

rows=()
for backend in $backends; do
  # A discarded first run: on a VM, writing into memory the guest has not touched yet
  # costs far more than reusing pages an earlier run freed, so whichever binary ran first
  # measured 0.2-0.3x slower (seen: 7.8-9.1 s against 5.5-6.2 s for the same binary).
  measure "${before_bin:-$bin}" "$backend" "$backend-warmup" > /dev/null
  for which in before after; do
    if [ "$which" = before ]; then b="$before_bin"; else b="$bin"; fi
    [ -n "$b" ] || continue
    read -r push pull hash upload commit index rest < <(measure "$b" "$backend" "$backend-$which")
    rows+=("$backend $which $push $pull $hash $upload $commit $index $rest")
  done
done

echo "file: $bytes bytes ($size_mib MiB), $(nproc) cores; sha256sum ${sha} s"
python3 - "$bytes" "$sha" "${rows[@]}" <<'PY'
import sys
size, sha = int(sys.argv[1]), float(sys.argv[2])
print("| store | binary | push | push vs sha256sum | pull | pull vs sha256sum | push: client hash | upload | commit | index | rest |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for row in sys.argv[3:]:
    store, which, push, pull, *ph = row.split()
    push, pull = float(push), float(pull)
    rate = lambda t: f"{size / t / 2**20:.0f} MiB/s"
    speed = lambda t: f"{sha / t:.2f}x speed"
    ph = " | ".join(p if p == "?" else f"{p} s" for p in ph)
    print(f"| {store} | {which} | {push:.1f} s ({rate(push)}) | {speed(push)} | {pull:.1f} s ({rate(pull)}) | {speed(pull)} | {ph} |")
PY
echo "pulled files identical: yes"
