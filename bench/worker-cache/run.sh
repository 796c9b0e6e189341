#!/usr/bin/env bash
# N distinct rank-16 q/k/v/o patches on a ~1.4 GB bf16 Llama-shaped base (the
# port-vs-peft models), ported onto v2 by ONE remote `patchport worker` when v2 is
# published. Reports what the registry served (patchport_pull_bytes_total) against the
# bytes ONE port reads, and the worker's mean port time against the offline
# `patchport port --merged` of the same pair in the same run (median of three runs after a discarded warm-up). A
# measurement, not a test.
#
#   bench/worker-cache/run.sh
#
# Environment:
#   PATCHPORT_BIN  the patchport binary (default $CARGO_TARGET_DIR/release/patchport)
#   BENCH_WORK     models and patches (default /tmp/patchport-bench, shared with
#                  bench/port-vs-peft); the registry of each run lives in $BENCH_WORK/run-*
#   BENCH_VENV     a Python venv with torch and safetensors (default: the CI venv
#                  ~/.cache/patchport-py/venv when it has them, else created at
#                  ~/.cache/patchport-bench/venv)
#   BENCH_PATCHES  how many patches (default 8)
#   BENCH_PORT     first of three local TCP ports used (default 47311)
#   WORKER_ARGS    extra `patchport worker` arguments (e.g. --concurrency 2)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$repo/target}"
bin="${PATCHPORT_BIN:-$target/release/patchport}"
work="${BENCH_WORK:-/tmp/patchport-bench}"
n="${BENCH_PATCHES:-8}"
port="${BENCH_PORT:-47311}"
[ -x "$bin" ] || { echo "no patchport binary at $bin (cargo build --release -p patchport)" >&2; exit 1; }

venv="${BENCH_VENV:-}"
if [ -z "$venv" ]; then
    if "$HOME/.cache/patchport-py/venv/bin/python" -c "import torch, safetensors" 2>/dev/null; then
        venv="$HOME/.cache/patchport-py/venv"
    else
        venv="$HOME/.cache/patchport-bench/venv"
    fi
fi
if ! "$venv/bin/python" -c "import torch, safetensors" 2>/dev/null; then
    echo "== creating the Python venv at $venv (torch, safetensors)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet torch safetensors
fi
py="$venv/bin/python"

mkdir -p "$work"
if [ ! -f "$work/lora/adapter_config.json" ]; then
    echo "== generating the models in $work"
    "$py" "$repo/bench/port-vs-peft/gen.py" "$work"
fi
one_port="$("$py" "$here/variants.py" "$work" "$n")"

# shellcheck source=bench/remote-worker.sh
source "$here/../remote-worker.sh"
remote_run_dir

# The anchor is the median of three runs: one run swings with the page cache and the
# machine (0.9-1.9 s seen for the same pair), the worker's figure is a mean of N ports.
echo "== the offline port of the same pair (p0, v1 -> v2, merged), a warm-up and three runs"
cat "$work"/v1/* "$work"/v2/* > /dev/null
# Run 0, the warm-up, is discarded: the first of a series was the slowest in four runs of six
# (it writes its 1.4 GB into memory the VM had not touched yet; see
# bench/transfer/README.md, ninth session).
offline_runs=()
for i in 0 1 2 3; do
    rm -rf "$run/offline"; sync
    o0="$(date +%s.%N)"
    "$bin" port --old-base "$work/v1" --new-base "$work/v2" --patch "$work/patches/p0" \
        --out "$run/offline" --merged > /dev/null
    o1="$(date +%s.%N)"
    [ "$i" = 0 ] || offline_runs+=("$(awk -v a="$o0" -v b="$o1" 'BEGIN { printf "%.3f", b - a }')")
done
rm -rf "$run/offline"
offline="$(printf '%s\n' "${offline_runs[@]}" | sort -g | sed -n 2p)"
echo "offline port --merged: ${offline_runs[*]} s (median $offline s)"

remote_start

pulled0="$(metric "$reg_metrics" patchport_pull_bytes_total)"
echo "== publishing v2 (parent v1): $n port jobs"
t0="$(date +%s.%N)"
"$bin" base push "$work/v2" --name bench/llama --version v2 --parent v1 > /dev/null
first=""
while [ "$(grep -c '"port.completed"' "$run/events" || true)" -lt "$n" ]; do
    sleep 0.2
    # The first port of a fresh worker alone: its cache is empty and the registry keeps
    # no hash state yet (read while the worker has completed exactly one port).
    if [ -z "$first" ] && [ "$(metric "$worker_metrics" patchport_worker_port_duration_seconds_count 'outcome="succeeded"')" = "1.000000" ]; then
        first="$(metric "$worker_metrics" patchport_worker_port_duration_seconds_sum 'outcome="succeeded"')"
    fi
    if ! kill -0 "${pids[1]}" 2>/dev/null; then echo "the worker exited:" >&2; tail -20 "$run/worker.log" >&2; exit 1; fi
done
t1="$(date +%s.%N)"
failed="$(grep '"port.completed"' "$run/events" | grep -vc '"succeeded"' || true)"
pulled1="$(metric "$reg_metrics" patchport_pull_bytes_total)"
hashed="$(metric "$reg_metrics" patchport_composed_bytes_hashed_total)"
kept="$(metric "$reg_metrics" patchport_composed_bytes_kept_total)"
port_sum="$(metric "$worker_metrics" patchport_worker_port_duration_seconds_sum 'outcome="succeeded"')"
port_count="$(metric "$worker_metrics" patchport_worker_port_duration_seconds_count 'outcome="succeeded"')"

awk -v n="$n" -v one="$one_port" -v p0="$pulled0" -v p1="$pulled1" -v t0="$t0" -v t1="$t1" \
    -v ps="$port_sum" -v pc="$port_count" -v off="$offline" -v failed="$failed" \
    -v hashed="$hashed" -v kept="$kept" -v first="$first" 'BEGIN {
    pulled = p1 - p0; wall = t1 - t0
    mean = (pc > 0) ? ps / pc : wall / n
    printf "ports: %d (not succeeded: %d)\n", n, failed
    printf "bytes ONE port reads (q/k/v/o of both bases + the patch): %.1f MB\n", one / 1e6
    printf "registry served (patchport_pull_bytes_total): %.1f MB = %.2fx one port (goal <= 1.5x)\n", pulled / 1e6, pulled / one
    printf "merged files at CompleteJob: %.1f MB read and hashed, %.1f MB from a kept hash state\n", hashed / 1e6, kept / 1e6
    printf "publish -> %dth port.completed: %.1f s\n", n, wall
    if (first != "" && pc > 1) printf "worker port time: the first %.2f s (cache empty), the %d after it %.2f s on average\n", first, pc - 1, (ps - first) / (pc - 1)
    printf "worker port time, mean of %d: %.2f s; offline port --merged, median of 3: %.2f s; ratio %.2fx (goal <= 2x)\n", pc, mean, off, mean / off
}'
