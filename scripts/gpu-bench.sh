#!/usr/bin/env bash
# The CUDA path measured on a machine with an NVIDIA GPU that reaches no package
# registry. One prepared run: build, exactness, speed, a table.
#
#   scripts/gpu-bench.sh --vendor    # on a machine WITH crates.io: vendor/ for the run
#   scripts/gpu-bench.sh             # on the GPU machine (the tree carried with vendor/)
#
# Steps (each prints a line; the table comes last):
#  0. Fails at once, saying why, without an NVIDIA GPU (no nvidia-smi, or no device).
#  1. Builds `patchport` and the engine's tests with --features cuda from vendor/
#     (cargo --offline; `cargo vendor` made it), with the CUDA toolkit it finds: nvcc on
#     PATH, $CUDA_HOME, /usr/local/cuda, or scripts/cuda-build.sh's PyPI toolkit
#     ($PATCHPORT_CUDA_DIR). CUDA_COMPUTE_CAP from nvidia-smi.
#  2. Exactness: the engine's test suite built with cuda; then every llama-micro fixture
#     patch ported with --device cuda:0 and with --device cpu, the merged models and
#     adapters compared byte for byte (the two paths round identically by design).
#  3. Speed: a 7B-shaped synthetic Llama (hidden 4096, intermediate 11008, 32 heads,
#     vocabulary 32000, bf16; $LAYERS layers, default 32 = 6.7B parameters) in two
#     versions and a rank-16 q/k/v/o LoRA, generated with Python's standard library;
#     `patchport port --merged` timed on cuda:0 and on cpu.
#  4. Evaluation speed: `patchport eval` of the task-llama fixture on cuda:0 and cpu.
#  5. The device's copy bandwidth (host->device, device->host, device->device; pinned
#     memory, a small CUDA program compiled here with nvcc) and the GPU merge's
#     throughput (bytes of the target weights read and written per second) as a
#     fraction of the host<->device copy bandwidth. Goal: >= 70 %.
#
# Environment: WORK (default /tmp/patchport-gpu-bench; needs ~3x the model, 40 GB at 32
# layers), LAYERS, CARGO_TARGET_DIR (default ~/.cache/patchport-cuda-target).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"

say() { printf 'gpu-bench: %s\n' "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }

if [ "${1:-}" = --vendor ]; then
  say "vendoring every crate of Cargo.lock into vendor/ (carry it with the tree)"
  cargo vendor --locked --versioned-dirs vendor >/dev/null
  say "vendor/: $(du -sh vendor | cut -f1)"
  exit 0
fi

# --- 0. A GPU --------------------------------------------------------------------------
command -v nvidia-smi >/dev/null ||
  { say "no NVIDIA GPU here: nvidia-smi not found. This bench needs a machine with an NVIDIA GPU and its driver."; exit 2; }
gpu="$(nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)" ||
  true
[ -n "$gpu" ] || { say "nvidia-smi lists no GPU: $(nvidia-smi 2>&1 | head -n 3)"; exit 2; }
cap="$(printf '%s' "$gpu" | cut -d, -f2 | tr -d ' .')"
say "GPU: $gpu"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-$cap}"

# --- 1. Build ----------------------------------------------------------------------------
if ! command -v nvcc >/dev/null; then
  for home in "${CUDA_HOME:-}" /usr/local/cuda; do
    if [ -n "$home" ] && [ -x "$home/bin/nvcc" ]; then
      export CUDA_HOME="$home" PATH="$home/bin:$PATH"
      export LIBRARY_PATH="$home/lib64:$home/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
      export LD_LIBRARY_PATH="$home/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      break
    fi
  done
fi
if ! command -v nvcc >/dev/null; then
  cuda_dir="${PATCHPORT_CUDA_DIR:-$HOME/.cache/patchport-cuda}"
  [ -d "$cuda_dir/venv" ] || die "no CUDA toolkit: no nvcc on PATH, in \$CUDA_HOME or /usr/local/cuda, and no $cuda_dir (scripts/cuda-build.sh --env installs one from PyPI where PyPI is reachable)"
  eval "$(scripts/cuda-build.sh --env)"
  # The venv's libraries for running; the driver's libcuda.so.1 comes from the system.
  export LD_LIBRARY_PATH="$PATCHPORT_CUDA_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
say "$(nvcc --version | grep release)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/patchport-cuda-target}"
offline=()
if [ -d vendor ]; then
  offline=(--offline --config 'source.crates-io.replace-with="vendored"'
    --config 'source.vendored.directory="vendor"')
fi
t=$(date +%s)
cargo build "${offline[@]}" --locked --release -p patchport --features cuda ||
  die "cargo build --features cuda (no vendor/ and no crates.io? run --vendor first)"
cargo test "${offline[@]}" --locked --release --no-run -p patchport-engine --features cuda 2>/dev/null >/dev/null ||
  die "building the engine's tests with cuda"
bin="$CARGO_TARGET_DIR/release/patchport"
build_s=$(($(date +%s) - t))
say "built in ${build_s}s: $bin"

# --- 2. Exactness --------------------------------------------------------------------------
work="${WORK:-/tmp/patchport-gpu-bench}"
rm -rf "$work"
mkdir -p "$work"
t=$(date +%s)
cargo test "${offline[@]}" --locked --release -q -p patchport-engine --features cuda >"$work/engine-tests.log" 2>&1 ||
  { tail -n 30 "$work/engine-tests.log" >&2; die "the engine's tests fail with cuda"; }
say "engine tests with cuda: $(grep -E '^test result' "$work/engine-tests.log" | awk '{p+=$4; f+=$6} END {print p" passed, "f" failed"}') ($(($(date +%s) - t))s)"
fx=tests/fixtures/llama-micro
exact=0
total=0
for p in "$fx"/patches/*; do
  name="$(basename "$p")"
  for dev in cpu cuda:0; do
    "$bin" port --old-base "$fx/v1" --new-base "$fx/v2" --patch "$p" --out "$work/exact/$name-${dev%%:*}" \
      --merged --device "$dev" --json >"$work/exact/$name-${dev%%:*}.json" 2>"$work/exact/$name-${dev%%:*}.err" || true
  done
  total=$((total + 1))
  if [ "$(jq -r .verdict "$work/exact/$name-cpu.json" 2>/dev/null)" = "$(jq -r .verdict "$work/exact/$name-cuda.json" 2>/dev/null)" ] &&
    { [ ! -d "$work/exact/$name-cpu" ] || diff -r "$work/exact/$name-cpu" "$work/exact/$name-cuda" >/dev/null; }; then
    exact=$((exact + 1))
  else
    say "DIFFERS: $name (cpu vs cuda:0): $(diff -rq "$work/exact/$name-cpu" "$work/exact/$name-cuda" 2>&1 | head -n 3)"
  fi
done
say "fixture ports byte-identical on cuda:0 and cpu: $exact of $total"

# --- 3. A 7B-shaped port -----------------------------------------------------------------
layers="${LAYERS:-32}"
say "generating the 7B-shaped model ($layers layers, bf16, two versions) and a rank-16 LoRA into $work/7b"
python3 - "$work/7b" "$layers" "$repo/$fx" <<'PY'
import json, os, struct, sys

out, layers, fx = sys.argv[1], int(sys.argv[2]), sys.argv[3]
H, I, V, R = 4096, 11008, 32000, 16
def shapes():
    yield "model.embed_tokens.weight", [V, H]
    for i in range(layers):
        p = f"model.layers.{i}."
        for m in ("q", "k", "v", "o"):
            yield p + f"self_attn.{m}_proj.weight", [H, H]
        yield p + "mlp.gate_proj.weight", [I, H]
        yield p + "mlp.up_proj.weight", [I, H]
        yield p + "mlp.down_proj.weight", [H, I]
        yield p + "input_layernorm.weight", [H]
        yield p + "post_attention_layernorm.weight", [H]
    yield "model.norm.weight", [H]
    yield "lm_head.weight", [V, H]

def bf16_block(seed, n):  # n bf16 values in [-0.05, 0.05), pseudo-random, never NaN
    x, vals = seed * 2654435761 % 2**32 or 1, bytearray()
    for _ in range(n):
        x ^= (x << 13) & 0xFFFFFFFF; x ^= x >> 17; x ^= (x << 5) & 0xFFFFFFFF
        f = (x / 2**32 - 0.5) * 0.1
        vals += struct.pack("<f", f)[2:4]
    return bytes(vals)

def write_safetensors(path, tensors, block):  # tensors: [(name, shape, dtype, elem)]
    header, off = {}, 0
    for name, shape, dtype, elem in tensors:
        n = elem
        for d in shape: n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h))); f.write(h)
        for name, shape, dtype, elem in tensors:
            n = elem
            for d in shape: n *= d
            data = block(name)
            while n > 0:
                k = min(n, len(data)); f.write(data[:k]); n -= k

cfg = json.load(open(os.path.join(fx, "v1", "config.json")))
cfg.update(hidden_size=H, intermediate_size=I, num_attention_heads=32, num_key_value_heads=32,
           head_dim=128, num_hidden_layers=layers, vocab_size=V, dtype="bfloat16",
           max_position_embeddings=4096)
tensors = [(n, s, "BF16", 2) for n, s in shapes()]
for version, seed in (("v1", 1), ("v2", 2)):
    d = os.path.join(out, version); os.makedirs(d, exist_ok=True)
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    blocks = {}
    def block(name, seed=seed):
        # One 4 MiB block per tensor kind and version; v2 differs from v1 (the drift).
        kind = name.split(".")[-2] if "layers" in name else name
        if kind not in blocks: blocks[kind] = bf16_block(seed * 1000 + len(blocks), 1 << 21)
        return blocks[kind]
    write_safetensors(os.path.join(d, "model.safetensors"), tensors, block)

pd = os.path.join(out, "lora"); os.makedirs(pd, exist_ok=True)
acfg = json.load(open(os.path.join(fx, "patches", "lora-qv", "adapter_config.json")))
acfg.update(r=R, lora_alpha=2 * R, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            base_model_name_or_path="synthetic-7b/v1")
json.dump(acfg, open(os.path.join(pd, "adapter_config.json"), "w"))
lt = []
for i in range(layers):
    for m in ("q", "k", "v", "o"):
        p = f"base_model.model.model.layers.{i}.self_attn.{m}_proj."
        lt += [(p + "lora_A.weight", [R, H], "F32", 4), (p + "lora_B.weight", [H, R], "F32", 4)]
a = b"".join(struct.pack("<f", ((k * 37) % 101 - 50) * 1e-3) for k in range(1 << 16))
write_safetensors(os.path.join(pd, "adapter_model.safetensors"), lt, lambda name: a)
PY
model_bytes=$(stat -c %s "$work/7b/v1/model.safetensors")
# Bytes the merge touches: each q/k/v/o weight read from the new base and written merged.
target_bytes=$((layers * 4 * 4096 * 4096 * 2 * 2))
declare -A port_s
for dev in cuda:0 cpu; do
  rm -rf "$work/7b/out"
  sync
  t0=$(date +%s.%N)
  "$bin" port --old-base "$work/7b/v1" --new-base "$work/7b/v2" --patch "$work/7b/lora" \
    --out "$work/7b/out" --merged --device "$dev" --json >"$work/7b/port-${dev%%:*}.json" ||
    die "the 7B-shaped port on $dev"
  port_s[$dev]=$(echo "$(date +%s.%N) - $t0" | bc)
  say "7B-shaped port --merged on $dev: ${port_s[$dev]} s"
done

# --- 4. Evaluation speed ---------------------------------------------------------------------
declare -A eval_s
for dev in cuda:0 cpu; do
  t0=$(date +%s.%N)
  "$bin" eval --base tests/fixtures/task-llama/v2 --patch tests/fixtures/task-llama/patches/lora-qvo \
    --eval tests/fixtures/task-llama/eval.jsonl --device "$dev" --json >"$work/eval-${dev%%:*}.json" ||
    die "eval on $dev"
  eval_s[$dev]=$(echo "$(date +%s.%N) - $t0" | bc)
done
items=$(wc -l <tests/fixtures/task-llama/eval.jsonl)

# --- 5. Copy bandwidth -----------------------------------------------------------------------
cat >"$work/bw.cu" <<'CU'
#include <cstdio>
#include <cuda_runtime.h>
// Pinned host<->device and device<->device copy bandwidth in GB/s (1 GiB, best of 5).
int main() {
  const size_t n = 1ull << 30;
  void *h, *d1, *d2;
  if (cudaMallocHost(&h, n) || cudaMalloc(&d1, n) || cudaMalloc(&d2, n)) { puts("alloc failed"); return 1; }
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  const char *names[3] = {"h2d", "d2h", "d2d"};
  for (int k = 0; k < 3; k++) {
    float best = 1e9;
    for (int r = 0; r < 5; r++) {
      cudaEventRecord(a);
      if (k == 0) cudaMemcpy(d1, h, n, cudaMemcpyHostToDevice);
      if (k == 1) cudaMemcpy(h, d1, n, cudaMemcpyDeviceToHost);
      if (k == 2) cudaMemcpy(d2, d1, n, cudaMemcpyDeviceToDevice);
      cudaEventRecord(b); cudaEventSynchronize(b);
      float ms; cudaEventElapsedTime(&ms, a, b); if (ms < best) best = ms;
    }
    // device-to-device moves the bytes twice (read + write)
    printf("%s %.2f\n", names[k], (k == 2 ? 2.0 : 1.0) * n / best / 1e6);
  }
  return 0;
}
CU
nvcc -O2 -o "$work/bw" "$work/bw.cu" -lcudart || die "nvcc could not build the bandwidth probe"
"$work/bw" >"$work/bw.txt" || die "the bandwidth probe failed: $(cat "$work/bw.txt")"
h2d=$(awk '$1 == "h2d" {print $2}' "$work/bw.txt")
d2h=$(awk '$1 == "d2h" {print $2}' "$work/bw.txt")
d2d=$(awk '$1 == "d2d" {print $2}' "$work/bw.txt")
merge_gbs=$(echo "scale=2; $target_bytes / ${port_s[cuda:0]} / 1000000000" | bc)
copy=$(echo "scale=2; if ($h2d < $d2h) $h2d else $d2h" | bc)
frac=$(echo "scale=1; 100 * $merge_gbs / $copy" | bc)

printf '\n| measurement | cuda:0 | cpu |\n|---|---|---|\n'
printf '| build with --features cuda | %s s | |\n' "$build_s"
printf '| fixture ports byte-identical (cuda vs cpu) | %s of %s | |\n' "$exact" "$total"
printf '| 7B-shaped port --merged (%s layers, %s GB per version) | %s s | %s s |\n' \
  "$layers" "$(echo "scale=1; $model_bytes / 1000000000" | bc)" "${port_s[cuda:0]}" "${port_s[cpu]}"
printf '| eval, task-llama (%s items, 3 arms) | %s s | %s s |\n' "$items" "${eval_s[cuda:0]}" "${eval_s[cpu]}"
printf '| copy bandwidth h2d / d2h / d2d (GB/s) | %s / %s / %s | |\n' "$h2d" "$d2h" "$d2d"
printf '| GPU merge throughput (target weights read+written) | %s GB/s = %s %% of min(h2d, d2h) | |\n' "$merge_gbs" "$frac"
if [ "$(echo "$frac >= 70" | bc)" = 1 ]; then
  printf '\ngoal (merge >= 70 %% of copy bandwidth): met\n'
else
  printf '\ngoal (merge >= 70 %% of copy bandwidth): NOT met\n'
fi
[ "$exact" = "$total" ] || die "$((total - exact)) fixture ports differ between cuda:0 and cpu"
