# Sourced by the benches that port N patches with ONE remote `patchport worker`
# (worker-cache, port-reuse). The caller sets bin, work (models: v1/ and patches/p0..),
# n (patches) and port (the first of three local TCP ports), then calls, in order:
#
#   remote_run_dir        $run (a fresh directory under $work), the registry's and the
#                         worker's addresses, PATCHPORT_REGISTRY, and a trap that stops
#                         every process started here and removes $run at exit
#   remote_start          a registry (SQLite + file:// under $run, metrics on port + 1),
#                         v1 and the n patches pushed, one worker (metrics on port + 2,
#                         extra arguments from $WORKER_ARGS) and a `watch` of
#                         port.completed into $run/events; pids: registry, worker, watch
#   metric ADDR NAME [LABEL-FILTER]   the sum of a metric's samples

remote_run_dir() {
    run="$work/run-$$"
    rm -rf "$run"; mkdir -p "$run/blobs"
    reg="127.0.0.1:$port"; reg_metrics="127.0.0.1:$((port + 1))"; worker_metrics="127.0.0.1:$((port + 2))"
    export PATCHPORT_REGISTRY="http://$reg"
    pids=()
    # BENCH_KEEP_RUN=1 keeps $run (the registry's and the worker's logs) at exit.
    trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; [ -n "${BENCH_KEEP_RUN:-}" ] || rm -rf "$run"' EXIT
}

metric() {
    curl -s "http://$1/metrics" | awk -v m="$2" -v f="${3:-}" '
        $0 !~ /^#/ && (index($1, m "{") == 1 || $1 == m) && index($0, f) { s += $NF } END { printf "%.6f\n", s + 0 }'
}

remote_start() {
    "$bin" serve --listen "$reg" --workers 0 --database "sqlite://$run/registry.db" \
        --blobs "file://$run/blobs" --metrics-listen "$reg_metrics" > "$run/serve.out" 2> "$run/serve.log" &
    pids+=($!)
    for _ in $(seq 1 100); do grep -q "listening" "$run/serve.out" 2>/dev/null && break; sleep 0.1; done

    echo "== pushing v1 and $n patches"
    "$bin" base push "$work/v1" --name bench/llama --version v1 > /dev/null
    for i in $(seq 0 $((n - 1))); do
        "$bin" patch push "$work/patches/p$i" --name "bench/p$i" --version 1 --base bench/llama:v1 > /dev/null
    done

    # shellcheck disable=SC2086 # WORKER_ARGS is a list of arguments
    "$bin" worker --id bench-worker --no-eval --cache-dir "$run/cache" --metrics-listen "$worker_metrics" \
        ${WORKER_ARGS:-} 2> "$run/worker.log" &
    pids+=($!)
    "$bin" watch --json --type port.completed > "$run/events" 2>/dev/null &
    pids+=($!)
    sleep 1
}
