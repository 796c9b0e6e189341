#!/usr/bin/env bash
# Fuzzes the parsers of patchport-core with cargo-fuzz (libFuzzer + AddressSanitizer).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   # default 600 s each, every target
#   scripts/fuzz.sh --seeds [TARGET...]                # replay the committed corpus only
#
# Targets (fuzz/fuzz_targets/): safetensors_header tensor_index adapter_config
# model_config names. Their properties are in fuzz/src/checks.rs (the proptest harness
# services/core/tests/fuzz_props.rs checks the same ones in the normal test suite).
#
# Every run uses -rss_limit_mb=1024 -malloc_limit_mb=256, so unbounded memory or one
# huge allocation is a crash like a panic. The committed seeds (fuzz/corpus/<target>/,
# regenerate with fuzz/seeds.py) are only read; what libFuzzer finds goes to
# fuzz/work/<target>/ (ignored), crashes to fuzz/artifacts/<target>/. The script fails
# if any target crashes.
#
# cargo-fuzz needs nightly flags; on a stable toolchain RUSTC_BOOTSTRAP=1 enables them.
# Set CARGO_TARGET_DIR to keep fuzz builds apart from the workspace's.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL=(safetensors_header tensor_index adapter_config model_config names)
seconds=600
seeds_only=0
if [ "${1:-}" = "--seeds" ]; then
  seeds_only=1
  shift
elif [[ "${1:-}" =~ ^[0-9]+$ ]]; then
  seconds=$1
  shift
fi
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${ALL[@]}")

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
if ! rustc --version | grep -q nightly; then
  export RUSTC_BOOTSTRAP=1
fi
# Every target, up front (-a: debug assertions and overflow checks on, as in the runs).
cargo fuzz build --fuzz-dir fuzz -a

# -timeout is wall-clock time per input: generous, because a run under `nice -n 19` on a
# busy machine can be starved for seconds (an instrumented compile of a pathological
# rank_pattern regex takes ~0.2 s of CPU but once took 13 s of wall time that way).
limits=(-rss_limit_mb=1024 -malloc_limit_mb=256 -timeout=60 -print_final_stats=1)
failed=()
for t in "${targets[@]}"; do
  mkdir -p "fuzz/work/$t" "fuzz/artifacts/$t"
  log="fuzz/work/$t.log"
  if [ "$seeds_only" = 1 ]; then
    log="fuzz/work/$t.seeds.log"
    echo "== $t: replaying $(ls "fuzz/corpus/$t" | wc -l) seeds"
    args=("fuzz/corpus/$t" -- -runs=0 "${limits[@]}")
  else
    echo "== $t: fuzzing for $seconds s (log: $log)"
    args=("fuzz/work/$t" "fuzz/corpus/$t" -- -max_total_time="$seconds" "${limits[@]}")
  fi
  # -a: debug assertions and overflow checks on, so an arithmetic overflow is a crash.
  if cargo fuzz run --fuzz-dir fuzz -a "$t" "${args[@]}" >"$log" 2>&1; then
    # The last status line: executions, coverage (edges), features, corpus size.
    summary=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
    runs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}' || true)
    echo "   ok: ${runs:-?} executions; last status: ${summary:-none}"
  else
    echo "   FAILED: see $log and fuzz/artifacts/$t/"
    grep -E 'panicked|ERROR: libFuzzer|ERROR: AddressSanitizer|malloc\(|out-of-memory' "$log" | head -5 || true
    failed+=("$t")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "crashed: ${failed[*]}"
  exit 1
fi
echo "all targets passed: ${targets[*]}"
