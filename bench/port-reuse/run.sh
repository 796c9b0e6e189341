#!/usr/bin/env bash
# Nothing computed twice: N distinct rank-16 q/k/v/o patches on a ~320 MB bf16
# Llama-shaped base (8 layers, hidden 1024; gen.py, numpy only), ported by ONE remote
# `patchport worker` onto v2 (every target tensor drifted) and then onto v3 (v2 with ONE
# target tensor changed). Reports, for each publish, the wall time from the publish to
# the N-th port.completed, the bytes the worker uploaded (the registry's
# patchport_push_bytes_total after the base push), the bytes the registry served it, and
# the worker's merged/reused tensor counters. Run it with the binary before and after
# the change to compare the v3 step. A measurement, not a test.
#
#   bench/port-reuse/run.sh
#
# Environment:
#   PATCHPORT_BIN  the patchport binary (default $CARGO_TARGET_DIR/release/patchport)
#   BENCH_WORK     models and patches (default /tmp/patchport-bench-reuse); the registry
#                  of each run lives in $BENCH_WORK/run-*
#   BENCH_PYTHON   a Python with numpy (default python3)
#   BENCH_PATCHES  how many patches (default 8)
#   BENCH_PORT     first of three local TCP ports used (default 47411)
#   BENCH_LAYERS, BENCH_HIDDEN  the base's shape (default 8 and 1024; a smoke run: 2, 128)
#   BENCH_NO_EARLIER  set: publish v3 alone (parent v1), so its ports have nothing to
#                  reuse: the same ports' cost without reuse, with the same binary
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$repo/target}"
bin="${PATCHPORT_BIN:-$target/release/patchport}"
work="${BENCH_WORK:-/tmp/patchport-bench-reuse}"
py="${BENCH_PYTHON:-python3}"
n="${BENCH_PATCHES:-8}"
port="${BENCH_PORT:-47411}"
[ -x "$bin" ] || { echo "no patchport binary at $bin (cargo build --release -p patchport)" >&2; exit 1; }

mkdir -p "$work"
if [ ! -f "$work/v3/model.safetensors" ] || [ ! -f "$work/patches/p$((n - 1))/adapter_config.json" ]; then
    echo "== generating the models in $work"
    "$py" "$here/gen.py" "$work" "$n" "${BENCH_LAYERS:-8}" "${BENCH_HIDDEN:-1024}" > /dev/null
fi

# shellcheck source=bench/remote-worker.sh
source "$here/../remote-worker.sh"
remote_run_dir
remote_start

# publish VERSION PARENT: pushes it, waits for the next N completions, prints one row.
# What the worker uploaded is the step's patchport_push_bytes_total less the base's new
# model.safetensors (its config.json is v1's, already stored).
done_ports=0
publish() {
    local t0 t1 t2 pushed0 pushed1 merged0 merged1 reused0 reused1 ps0 ps1 base
    pushed0="$(metric "$reg_metrics" patchport_push_bytes_total)"
    merged0="$(metric "$worker_metrics" patchport_worker_tensors_merged_total)"
    reused0="$(metric "$worker_metrics" patchport_worker_tensors_reused_total)"
    ps0="$(metric "$worker_metrics" patchport_worker_port_duration_seconds_sum 'outcome="succeeded"')"
    base="$(stat -c %s "$work/$1/model.safetensors")"
    t0="$(date +%s.%N)"
    "$bin" base push "$work/$1" --name bench/llama --version "$1" --parent "$2" > /dev/null
    t1="$(date +%s.%N)"
    done_ports=$((done_ports + n))
    while [ "$(grep -c '"port.completed"' "$run/events" || true)" -lt "$done_ports" ]; do
        sleep 0.1
        if ! kill -0 "${pids[1]}" 2>/dev/null; then echo "the worker exited:" >&2; tail -20 "$run/worker.log" >&2; exit 1; fi
    done
    t2="$(date +%s.%N)"
    pushed1="$(metric "$reg_metrics" patchport_push_bytes_total)"
    merged1="$(metric "$worker_metrics" patchport_worker_tensors_merged_total)"
    reused1="$(metric "$worker_metrics" patchport_worker_tensors_reused_total)"
    ps1="$(metric "$worker_metrics" patchport_worker_port_duration_seconds_sum 'outcome="succeeded"')"
    awk -v v="$1" -v n="$n" -v t0="$t0" -v t1="$t1" -v t2="$t2" -v p0="$pushed0" -v p1="$pushed1" -v base="$base" \
        -v m0="$merged0" -v m1="$merged1" -v r0="$reused0" -v r1="$reused1" -v ps0="$ps0" -v ps1="$ps1" 'BEGIN {
        printf "%s: base push %.1f s; then %d ports in %.1f s (worker port time, mean %.2f s); worker uploaded %.1f MB; tensors merged %d, reused %d\n",
            v, t1 - t0, n, t2 - t1, (ps1 - ps0) / n, (p1 - p0 - base) / 1e6, m1 - m0, r1 - r0
    }'
}

if [ -n "${BENCH_NO_EARLIER:-}" ]; then
    # The same v3 ports with no earlier port to reuse from: the work without reuse.
    echo "== publishing v3 alone (parent v1): no earlier port to reuse from"
    publish v3 v1
else
    echo "== publishing v2 (parent v1; every target tensor drifted) and v3 (parent v2; one changed)"
    publish v2 v1
    publish v3 v2
fi
failed="$(grep '"port.completed"' "$run/events" | grep -vc '"succeeded"' || true)"
echo "ports not succeeded: $failed"
