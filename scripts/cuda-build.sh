#!/usr/bin/env bash
# Builds `patchport` with the `cuda` feature (candle's CUDA backend) on a machine with no
# GPU and no system CUDA: the toolkit comes from PyPI.
#
#   scripts/cuda-build.sh                 # release build of the binary
#   scripts/cuda-build.sh --tests         # also the engine's and eval's test binaries
#   eval "$(scripts/cuda-build.sh --env)" # only set up the toolkit; print its variables
#   scripts/cuda-build.sh --wheels        # the pinned runtime wheels (for a runtime image)
#
# 1. Installs NVIDIA's CUDA 13.0 compiler, headers and libraries (nvidia-cuda-nvcc,
#    -cccl, -runtime, -nvrtc, -crt, nvidia-nvvm, nvidia-cublas, nvidia-curand; every one
#    pinned: nvcc's own dependencies float, and a newer cicc writes PTX the pinned ptxas
#    refuses; 13.0 is a version cudarc supports) into a venv under ${PATCHPORT_CUDA_DIR:-$HOME/.cache/patchport-cuda}
#    (once; reused), and lays out a CUDA_HOME there (bin, include, lib64 with the
#    unversioned names the linker wants).
# 2. The wheels have no libcuda (it comes with the GPU driver): a stub libcuda.so with
#    soname libcuda.so.1 and every driver entry point of cuda.h is compiled for the link,
#    as the toolkit's own lib64/stubs/libcuda.so is; at run time the driver's libcuda.so.1
#    is loaded instead.
# 3. Builds with CUDA_COMPUTE_CAP (default 90, H100/H200) into its own target directory
#    (${PATCHPORT_CUDA_TARGET_DIR:-$HOME/.cache/patchport-cuda-target}): candle-kernels'
#    build script runs nvcc to compile every kernel to PTX. The script fails unless the
#    build log shows that nvcc ran (or the kernels' PTX from an earlier run is there).
#
# The binary: $PATCHPORT_CUDA_TARGET_DIR/release/patchport. No GPU is needed to build;
# running it needs the NVIDIA driver and the CUDA 13 libraries (the venv's lib64, or a
# CUDA 13 runtime image).
set -euo pipefail
cd "$(dirname "$0")/.."

cuda_dir="${PATCHPORT_CUDA_DIR:-$HOME/.cache/patchport-cuda}"
target_dir="${PATCHPORT_CUDA_TARGET_DIR:-$HOME/.cache/patchport-cuda-target}"
compute_cap="${CUDA_COMPUTE_CAP:-90}"
venv="$cuda_dir/venv"
home="$cuda_dir/cuda-13.0"
# CUDA 13.0 throughout (cudarc 0.19 supports 12.5 to 13.4; the oldest 13.x asks the least
# of the driver).
wheels=(
  "nvidia-cuda-nvcc==13.0.88"
  "nvidia-nvvm==13.0.88"
  "nvidia-cuda-crt==13.0.88"
  "nvidia-cuda-cccl==13.0.85"
  "nvidia-cuda-runtime==13.0.96"
  "nvidia-cuda-nvrtc==13.0.88"
  "nvidia-cublas==13.0.2.14"
  "nvidia-curand==10.4.0.35"
)

log() { printf 'cuda-build: %s\n' "$*" >&2; }

mode=build
tests=0
for arg in "$@"; do
  case "$arg" in
    --env) mode=env ;;
    --tests) tests=1 ;;
    --wheels)
      # What running the binary needs (no compiler, no headers).
      printf '%s\n' "${wheels[@]}" | grep -E 'runtime|nvrtc|cublas|curand' | tr '\n' ' '
      echo
      exit 0
      ;;
    *) log "unknown argument '$arg' (expected --env, --wheels or --tests)"; exit 2 ;;
  esac
done

mkdir -p "$cuda_dir"
stamp="$cuda_dir/.installed-$(printf '%s\n' "${wheels[@]}" | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  log "installing the CUDA toolkit wheels into $venv (PyPI)"
  rm -rf "$venv" "$home"
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${wheels[@]}" >&2
fi
nv="$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"

if [ ! -e "$stamp" ] || [ ! -x "$home/bin/nvcc" ]; then
  log "laying out CUDA_HOME at $home"
  rm -rf "$home"
  mkdir -p "$home/lib64" "$home/bin"
  for tool in "$nv"/bin/*; do ln -s "$tool" "$home/bin/$(basename "$tool")"; done
  # nvcc, wrapped so that the build log names every compilation it runs.
  rm "$home/bin/nvcc"
  printf '%s\n' '#!/bin/sh' \
    '[ -n "${PATCHPORT_NVCC_LOG:-}" ] && printf "nvcc-ran: %s\n" "$*" >>"$PATCHPORT_NVCC_LOG"' \
    "exec \"$nv/bin/nvcc\" \"\$@\"" >"$home/bin/nvcc"
  chmod +x "$home/bin/nvcc"
  ln -s "$nv/include" "$home/include"
  ln -s "$nv/nvvm" "$home/nvvm"
  for lib in "$nv"/lib/lib*.so.*; do
    name="$(basename "$lib")"
    ln -sf "$lib" "$home/lib64/$name"
    ln -sf "$lib" "$home/lib64/${name%%.so.*}.so"
  done
  # The driver stub: every cu* entry point cuda.h declares or #defines to a versioned name.
  grep -ohE 'CUDAAPI +cu[A-Za-z0-9_]+|^#define +cu[A-Za-z0-9_]+ +cu[A-Za-z0-9_]+' \
    "$nv/include/cuda.h" |
    grep -oE 'cu[A-Za-z0-9_]+' | sort -u |
    sed 's/.*/int &(void) { return 999; }/' >"$home/lib64/cuda-stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$home/lib64/libcuda.so" "$home/lib64/cuda-stub.c"
  touch "$stamp"
fi

cat_env() {
  cat <<EOF
export CUDA_HOME=$home
export CUDA_PATH=$home
export CUDA_COMPUTE_CAP=$compute_cap
export NVCC=$home/bin/nvcc
export PATH=$home/bin:\$PATH
export LIBRARY_PATH=$home/lib64\${LIBRARY_PATH:+:\$LIBRARY_PATH}
export PATCHPORT_CUDA_LIB=$home/lib64
EOF
}

if [ "$mode" = env ]; then
  cat_env
  exit 0
fi
eval "$(cat_env)"
log "$(nvcc --version | tail -n 2 | head -n 1)"

mkdir -p "$target_dir"
# candle-kernels compiles its 15 static (MoE, GGUF) kernels on one thread unless told.
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
build_log="$target_dir/cuda-build.log"
: >"$build_log"
export PATCHPORT_NVCC_LOG="$build_log"
log "building with --features cuda (CUDA_COMPUTE_CAP=$compute_cap) into $target_dir (log: $build_log)"
start=$(date +%s)
args=(build --locked --release -p patchport --features cuda)
CARGO_TARGET_DIR="$target_dir" cargo "${args[@]}" -vv >>"$build_log" 2>&1 || {
  tail -n 60 "$build_log" >&2
  log "the cuda build failed (full log: $build_log)"
  exit 1
}
if [ "$tests" = 1 ]; then
  CARGO_TARGET_DIR="$target_dir" cargo test --locked --release --no-run \
    -p patchport-engine -p patchport-eval --features patchport-engine/cuda,patchport-eval/cuda \
    -vv >>"$build_log" 2>&1 || {
    tail -n 60 "$build_log" >&2
    log "building the cuda test binaries failed (full log: $build_log)"
    exit 1
  }
fi

# Proof that the kernels were compiled: nvcc ran in this build (--ptx: the PTX kernels;
# -c: the static MoE/GGUF ones), or candle-kernels' build found the PTX an earlier build
# compiled (cudaforge keeps them in its OUT_DIR; nvcc-ran.log has that run's lines).
grep -E '^nvcc-ran: .*(--ptx| -c )' "$build_log" | sed "s/^/$(date -u +%FT%TZ) /" >>"$target_dir/nvcc-ran.log" || true
nvcc_runs="$(grep -cE '^nvcc-ran: .*--ptx' "$build_log" || true)"
ptx="$(find "$target_dir/release/build" -path '*candle-kernels-*/out/*.ptx' 2>/dev/null | wc -l)"
if [ "$nvcc_runs" -gt 0 ]; then
  log "nvcc compiled $nvcc_runs kernel sources to PTX in this build ($ptx .ptx files; see the nvcc-ran lines of $build_log)"
elif [ "$ptx" -gt 0 ] && grep -qE 'Fresh candle-kernels|All PTX kernels up-to-date' "$build_log"; then
  log "candle's $ptx PTX kernels are up to date: nvcc compiled them in an earlier build (see $target_dir/nvcc-ran.log)"
else
  log "no sign that nvcc compiled candle's kernels (no nvcc-ran line in $build_log, $ptx .ptx files)"
  exit 1
fi
bin="$target_dir/release/patchport"
log "built $bin in $(($(date +%s) - start)) s"
if readelf -d "$bin" | grep -q 'libcuda.so.1'; then
  log "links the driver (libcuda.so.1) and $(readelf -d "$bin" | grep -oE 'lib(cublas|curand|nvrtc)[A-Za-z]*\.so\.[0-9]+' | sort -u | tr '\n' ' ')"
else
  log "$bin does not link libcuda.so.1: the cuda feature did not take"
  exit 1
fi
