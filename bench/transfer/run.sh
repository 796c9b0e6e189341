#!/usr/bin/env bash
# Push and pull throughput of one large safetensors file over loopback gRPC, against
# `sha256sum` of the same file (a ratio, from one run). A measurement, not a test.
#
#   bench/transfer/run.sh [SIZE_MIB]        # default 2048 (2 GiB)
#
# Uses the release binary ($PATCHPORT_BIN, default $CARGO_TARGET_DIR/release/patchport,
# built if missing), a registry on 127.0.0.1 with SQLite + file:// under $BENCH_WORK
# (default /tmp/patchport-transfer-bench), and a fresh random file each run.
set -euo pipefail
cd "$(dirname "$0")/../.."
size_mib="${1:-2048}"
work="${BENCH_WORK:-/tmp/patchport-transfer-bench}"
target="${CARGO_TARGET_DIR:-target}"
bin="${PATCHPORT_BIN:-$target/release/patchport}"
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
rate() { python3 -c "print(f'{$1 / ($2) / 2**20:.0f} MiB/s')"; }

cat "$work/model/model.safetensors" > /dev/null   # warm the page cache
t0=$(now); sha256sum "$work/model/model.safetensors" > /dev/null; t1=$(now)
sha=$(secs "$t0" "$t1")

port=$((20000 + RANDOM % 20000))
"$bin" serve --listen "127.0.0.1:$port" --database "sqlite://$work/data/registry.db" \
  --blobs "file://$work/data/blobs" > "$work/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do grep -q listening "$work/serve.log" && break; sleep 0.1; done
export PATCHPORT_REGISTRY="http://127.0.0.1:$port"

t0=$(now); "$bin" base push "$work/model" --name bench/big --version v1 > /dev/null; t1=$(now)
push=$(secs "$t0" "$t1")
sync "$work/data" 2>/dev/null || true
t0=$(now); "$bin" pull bench/big:v1 --out "$work/pulled" > /dev/null; t1=$(now)
pull=$(secs "$t0" "$t1")
cmp "$work/model/model.safetensors" "$work/pulled/model.safetensors"

echo "file: $bytes bytes ($size_mib MiB), $(nproc) cores"
echo "sha256sum:        ${sha} s  ($(rate "$bytes" "$sha"))"
echo "patchport push:   ${push} s  ($(rate "$bytes" "$push"))  = $(python3 -c "print(f'{$push/$sha:.1f}')")x sha256sum"
echo "patchport pull:   ${pull} s  ($(rate "$bytes" "$pull"))  = $(python3 -c "print(f'{$pull/$sha:.1f}')")x sha256sum"
echo "pulled file identical: yes"
