#!/usr/bin/env bash
# patchport port --merged against PEFT's merge_and_unload + save_pretrained, on a
# Llama-shaped bf16 base of about 1.4 GB (two versions) and a rank-16 q/k/v/o LoRA.
# Reports wall time and peak RSS of both, and the ratios. A measurement, not a test.
#
#   bench/port-vs-peft/run.sh
#
# Environment:
#   PATCHPORT_BIN   the patchport binary (default $CARGO_TARGET_DIR/release/patchport,
#                   CARGO_TARGET_DIR defaulting to ./target)
#   BENCH_WORK      where the models and outputs go (default /tmp/patchport-bench)
#   BENCH_VENV      the Python venv, created when missing
#                   (default ~/.cache/patchport-bench/venv)
#   BENCH_REPEAT    timed runs of each side; the best is reported (default 3)
#   PIP_TORCH_INDEX an extra index for torch (e.g. a CPU-only wheel index); default PyPI
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$repo/target}"
bin="${PATCHPORT_BIN:-$target/release/patchport}"
work="${BENCH_WORK:-/tmp/patchport-bench}"
venv="${BENCH_VENV:-$HOME/.cache/patchport-bench/venv}"
repeat="${BENCH_REPEAT:-3}"

[ -x /usr/bin/time ] || { echo "needs GNU time at /usr/bin/time (apt-get install time)" >&2; exit 1; }
if [ ! -x "$bin" ]; then
    echo "no patchport binary at $bin: build it with 'cargo build --release -p patchport'" >&2
    echo "(or set PATCHPORT_BIN; the engine's stand-in: cargo build --release -p patchport-engine --example port)" >&2
    exit 1
fi

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, transformers, peft, safetensors" 2>/dev/null; then
    echo "== creating the Python venv at $venv (torch, transformers, peft, safetensors)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    if [ -n "${PIP_TORCH_INDEX:-}" ]; then
        "$venv/bin/pip" install --quiet torch --index-url "$PIP_TORCH_INDEX"
    fi
    "$venv/bin/pip" install --quiet torch transformers peft safetensors
fi
py="$venv/bin/python"
"$py" -c "import torch, transformers, peft; print('== torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"

mkdir -p "$work"
if [ ! -f "$work/lora/adapter_config.json" ]; then
    echo "== generating the models in $work"
    "$py" "$here/gen.py" "$work"
fi
du -sh "$work/v1" "$work/v2" "$work/lora"

# Warm the page cache: both sides read the same inputs.
cat "$work"/v1/* "$work"/v2/* "$work"/lora/* > /dev/null

# Runs a command under GNU time; prints "wall_seconds max_rss_kib".
measure() {
    local log="$1"; shift
    /usr/bin/time -v "$@" > "$log.out" 2> "$log.time" || { cat "$log.out" "$log.time" >&2; return 1; }
    awk '
        /Elapsed \(wall clock\)/ { n = split($NF, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; wall = s }
        /Maximum resident set size/ { rss = $NF }
        END { printf "%.3f %d\n", wall, rss }
    ' "$log.time"
}

best() { sort -n -k1,1 | head -1; }

ours_runs="$work/ours.runs"; peft_runs="$work/peft.runs"
: > "$ours_runs"; : > "$peft_runs"
for i in $(seq 1 "$repeat"); do
    rm -rf "$work/out-ours" "$work/out-peft"; sync
    measure "$work/ours" "$bin" port --old-base "$work/v1" --new-base "$work/v2" \
        --patch "$work/lora" --out "$work/out-ours" --merged >> "$ours_runs"
    sync
    measure "$work/peft" "$py" "$here/peft_merge.py" "$work/v2" "$work/lora" "$work/out-peft" >> "$peft_runs"
    echo "run $i: patchport $(tail -1 "$ours_runs")  peft $(tail -1 "$peft_runs")  (wall s, peak RSS KiB)"
done

read -r ours_wall ours_rss < <(best < "$ours_runs")
read -r peft_wall peft_rss < <(best < "$peft_runs")
echo "== PEFT phases (last run): $(tail -1 "$work/peft.out")"
"$py" "$here/compare.py" "$work/out-ours/merged/model.safetensors" "$work/out-peft/model.safetensors" "$work/v2/model.safetensors"
awk -v ow="$ours_wall" -v orss="$ours_rss" -v pw="$peft_wall" -v prss="$peft_rss" 'BEGIN {
    printf "== best of '"$repeat"' runs, warm page cache\n"
    printf "patchport port --merged: %7.2f s wall, %7.0f MiB peak RSS\n", ow, orss / 1024
    printf "PEFT merge_and_unload:   %7.2f s wall, %7.0f MiB peak RSS\n", pw, prss / 1024
    printf "speed-up %.1fx (goal >= 5x); RSS ratio 1/%.1f (goal <= 1/8)\n", pw / ow, prss / orss
}'
