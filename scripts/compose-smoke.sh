#!/usr/bin/env bash
# The compose stack, built and run on this machine with no container registry:
#
#   scripts/compose-smoke.sh
#
# 1. Docker: installs docker.io, docker-compose, debootstrap and jq (apt) when missing and
#    starts dockerd when none answers. Always Debian's /usr/bin/docker (its BuildKit
#    builds offline) and docker-compose 1.29 (COMPOSE=... for another, e.g.
#    "docker compose").
# 2. Base images, cached between runs: local/debian:bookworm (debootstrap --variant=minbase,
#    tarball kept in ~/.cache/patchport-docker/), and from deploy/docker/local/
#    local/runtime:bookworm (+ CA certificates, the runtime base), local/postgres:15-bookworm
#    and local/moto:5.2.5. Delete them to rebuild.
# 3. The registry and worker images from deploy/docker/Dockerfile with BINARY=prebuilt:
#    the host-built binary ($PATCHPORT_BIN, default $CARGO_TARGET_DIR/debug/patchport,
#    built when missing), so nothing compiles twice. With $PATCHPORT_CUDA_BIN (the
#    binary scripts/cuda-build.sh made) the CUDA worker image is built too, on
#    local/cuda-runtime (the same CUDA 13.0 libraries from PyPI; cached), and checked to
#    resolve every library but the driver's libcuda.so.1 (not run: no GPU here).
# 4. `docker-compose -p pp-smoke-PID -f deploy/compose.yaml -f deploy/compose.local.yaml`:
#    Postgres, an S3 server (moto), the bucket job, two registry replicas, two workers,
#    on the project's private network; only the replicas' gRPC ports are published
#    (127.0.0.1:$PATCHPORT_PORT and $PATCHPORT_PORT_2, default 50061/50062).
# 5. From the host, with the host-built CLI: push the llama-micro base v1 and its six
#    fixture patches through replica A, publish v2 (--parent v1); `watch` on replica B
#    must see every port.completed; `compat` agrees; pull the base and a ported patch
#    back through B, byte-identical and verified.
# 6. Fault: one more patch (lora-qv with another alpha) and its port requested; the worker that leases its port (the workers stall
#    $STALL_MS after each lease, PATCHPORT_TEST_STALL_MS) is `docker kill`ed mid-port;
#    the lease expires, the other worker ports it, and it completes exactly once.
# 7. Down with volumes; the images built in 3 and the build cache no image uses removed;
#    no container of the project left (a trap does it on every exit). Exit 0 only when all of it held.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"

docker=/usr/bin/docker
export DOCKER_BUILDKIT=1
cache="${PATCHPORT_DOCKER_CACHE:-$HOME/.cache/patchport-docker}"
project="pp-smoke-$$"
stall_ms="${STALL_MS:-4000}"
lease_s="${LEASE_SECONDS:-8}"
export PATCHPORT_PORT="${PATCHPORT_PORT:-50061}" PATCHPORT_PORT_2="${PATCHPORT_PORT_2:-50062}"
export PATCHPORT_METRICS_PORT="${PATCHPORT_METRICS_PORT:-19090}"
export PATCHPORT_METRICS_PORT_2="${PATCHPORT_METRICS_PORT_2:-19091}"
export PATCHPORT_MINIO_CONSOLE_PORT="${PATCHPORT_MINIO_CONSOLE_PORT:-19001}"
export PATCHPORT_REGISTRY_IMAGE="local/patchport-registry:$project"
export PATCHPORT_WORKER_IMAGE="local/patchport-worker:$project"
cuda_image="local/patchport-worker-cuda:$project"
a="http://127.0.0.1:$PATCHPORT_PORT"
b="http://127.0.0.1:$PATCHPORT_PORT_2"
token=local-stack-admin-token-change-me

t0=$(date +%s)
say() { printf 'compose-smoke [%4ss]: %s\n' "$(($(date +%s) - t0))" "$*" >&2; }
fail() { say "FAILED: $*"; exit 1; }

work="$(mktemp -d)"
started_dockerd=""
compose_files=()
cleanup() {
  local rc=$?
  set +e
  if [ "${#compose_files[@]}" -gt 0 ]; then
    if [ "$rc" != 0 ]; then
      say "logs of the failed run (last 40 lines per service):"
      "${compose[@]}" -p "$project" "${compose_files[@]}" logs --no-color --tail 40 >&2 2>&1
    fi
    "${compose[@]}" -p "$project" "${compose_files[@]}" down -v --remove-orphans >/dev/null 2>&1
  fi
  [ -n "${watch_pid:-}" ] && kill "$watch_pid" 2>/dev/null
  left="$("$docker" ps -aq --filter "label=com.docker.compose.project=$project" 2>/dev/null)"
  if [ -n "$left" ]; then
    say "removing containers left behind: $left"
    "$docker" rm -f $left >/dev/null 2>&1
  fi
  "$docker" rmi "$PATCHPORT_REGISTRY_IMAGE" "$PATCHPORT_WORKER_IMAGE" "$cuda_image" >/dev/null 2>&1
  # The build cache no image uses (the binaries' build contexts, ~160 MB a build).
  "$docker" builder prune -f >/dev/null 2>&1
  "$docker" volume ls -q --filter "label=com.docker.compose.project=$project" | xargs -r "$docker" volume rm >/dev/null 2>&1
  "$docker" network ls -q --filter "label=com.docker.compose.project=$project" | xargs -r "$docker" network rm >/dev/null 2>&1
  rm -rf "$work"
  if [ -n "$started_dockerd" ]; then
    kill "$started_dockerd" 2>/dev/null
  fi
  if [ "$rc" = 0 ]; then say "PASSED; everything taken down"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. Docker ------------------------------------------------------------------------
if [ ! -x "$docker" ] || ! command -v docker-compose >/dev/null || ! command -v debootstrap >/dev/null ||
  ! command -v jq >/dev/null; then
  say "installing docker.io, docker-compose, debootstrap, jq (apt)"
  pkgs=(docker.io docker-compose debootstrap jq)
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}" >/dev/null ||
    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}" >/dev/null; }
fi
if [ -n "${COMPOSE:-}" ]; then read -ra compose <<<"$COMPOSE"; else compose=(/usr/bin/docker-compose); fi
if ! "$docker" info >/dev/null 2>&1; then
  mkdir -p "$cache"
  say "starting dockerd (log: $cache/dockerd.log)"
  /usr/sbin/dockerd >"$cache/dockerd.log" 2>&1 &
  started_dockerd=$!
  for _ in $(seq 1 60); do "$docker" info >/dev/null 2>&1 && break; sleep 1; done
  "$docker" info >/dev/null 2>&1 || fail "dockerd did not start; see $cache/dockerd.log"
fi

# --- 2. Base images (cached) ----------------------------------------------------------
mkdir -p "$cache"
if ! "$docker" image inspect local/debian:bookworm >/dev/null 2>&1; then
  tarball="$cache/debian-bookworm-minbase.tar"
  if [ ! -s "$tarball" ]; then
    say "debootstrap --variant=minbase bookworm (once; kept as $tarball)"
    root="$work/debian"
    debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >"$cache/debootstrap.log" 2>&1 ||
      fail "debootstrap failed; see $cache/debootstrap.log"
    tar -C "$root" -c . >"$tarball.partial" && mv "$tarball.partial" "$tarball"
    rm -rf "$root"
  fi
  say "importing local/debian:bookworm from $tarball"
  "$docker" import - local/debian:bookworm <"$tarball" >/dev/null
fi
for spec in "local/runtime:bookworm runtime.Dockerfile" "local/postgres:15-bookworm postgres.Dockerfile" \
  "local/moto:5.2.5 moto.Dockerfile"; do
  read -r image file <<<"$spec"
  if ! "$docker" image inspect "$image" >/dev/null 2>&1; then
    say "building $image (once; from Debian's and PyPI's packages)"
    # The host's CA bundle, for pip behind a TLS-intercepting proxy (a build secret).
    "$docker" build -q --secret "id=ca,src=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}" \
      --build-arg BASE_IMAGE=local/debian:bookworm \
      -f "deploy/docker/local/$file" -t "$image" deploy/docker/local >/dev/null
  fi
done

# --- 3. patchport images from the host-built binary -----------------------------------
bin="${PATCHPORT_BIN:-${CARGO_TARGET_DIR:-$repo/target}/debug/patchport}"
if [ ! -x "$bin" ]; then
  say "building the patchport binary (cargo build --locked -p patchport)"
  cargo build --locked -q -p patchport
fi
[ -x "$bin" ] || fail "no binary at $bin (set PATCHPORT_BIN)"
mkdir -p "$work/context"
cp "$bin" "$work/context/patchport"
for target in registry worker; do
  image="$PATCHPORT_REGISTRY_IMAGE"
  [ "$target" = worker ] && image="$PATCHPORT_WORKER_IMAGE"
  say "building $image (deploy/docker/Dockerfile --target $target, BINARY=prebuilt)"
  "$docker" build -q -f deploy/docker/Dockerfile --target "$target" \
    --build-arg BINARY=prebuilt --build-arg RUNTIME_IMAGE=local/runtime:bookworm \
    -t "$image" "$work/context" >/dev/null
done
"$docker" run --rm "$PATCHPORT_WORKER_IMAGE" --version >/dev/null ||
  fail "the worker image does not run its binary"
if [ -n "${PATCHPORT_CUDA_BIN:-}" ]; then
  [ -x "$PATCHPORT_CUDA_BIN" ] || fail "no CUDA binary at $PATCHPORT_CUDA_BIN (scripts/cuda-build.sh makes it)"
  wheels="$(scripts/cuda-build.sh --wheels)"
  cuda_base="local/cuda-runtime:$(printf '%s' "$wheels" | sha256sum | cut -c1-12)"
  if ! "$docker" image inspect "$cuda_base" >/dev/null 2>&1; then
    say "building $cuda_base (once; the CUDA libraries the binary was built with, from PyPI)"
    "$docker" build -q --secret "id=ca,src=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}" \
      --build-arg BASE_IMAGE=local/debian:bookworm --build-arg "CUDA_WHEELS=$wheels" \
      -f deploy/docker/local/cuda-runtime.Dockerfile -t "$cuda_base" deploy/docker/local >/dev/null
  fi
  mkdir -p "$work/cuda-context"
  cp "$PATCHPORT_CUDA_BIN" "$work/cuda-context/patchport"
  say "building $cuda_image (deploy/docker/Dockerfile.cuda, BINARY=prebuilt)"
  "$docker" build -q -f deploy/docker/Dockerfile.cuda \
    --build-arg BINARY=prebuilt --build-arg "CUDA_RUNTIME_IMAGE=$cuda_base" \
    -t "$cuda_image" "$work/cuda-context" >/dev/null
  # No GPU here, so it cannot run; but as uid 65532 every library it links must resolve
  # in the image except the driver's libcuda.so.1 (the NVIDIA runtime mounts it).
  missing="$("$docker" run --rm --entrypoint /bin/sh "$cuda_image" -c \
    'test "$(id -u)" = 65532 && ldd /usr/local/bin/patchport | grep "not found" | cut -d" " -f1 | tr -d "\t"')" ||
    fail "the CUDA image: not uid 65532, or no binary"
  [ "$missing" = "libcuda.so.1" ] || fail "the CUDA image lacks libraries: $missing"
  say "CUDA image: every library resolves but the driver's libcuda.so.1 (not run: no GPU)"
fi

# --- 4. The stack -----------------------------------------------------------------------
cat >"$work/smoke.yaml" <<EOF
# This run only: short leases, and workers that stall after each lease (test hook), so
# that a worker can be killed mid-port.
services:
  registry:
    environment:
      PATCHPORT_LEASE_SECONDS: "$lease_s"
  registry-2:
    environment:
      PATCHPORT_LEASE_SECONDS: "$lease_s"
  worker:
    environment:
      PATCHPORT_TEST_STALL_MS: "$stall_ms"
EOF
compose_files=(-f deploy/compose.yaml -f deploy/compose.local.yaml -f "$work/smoke.yaml")
say "starting project $project: postgres, minio (moto), bucket, registry, registry-2, 2 x worker"
"${compose[@]}" -p "$project" "${compose_files[@]}" up -d --no-build --scale worker=2 >"$work/up.log" 2>&1 ||
  { cat "$work/up.log" >&2; fail "compose up"; }

export PATCHPORT_TOKEN="$token"
pp() { "$bin" "$@"; }
for url in "$a" "$b"; do
  for _ in $(seq 1 90); do pp health --registry "$url" >/dev/null 2>&1 && break; sleep 1; done
  pp health --registry "$url" >/dev/null 2>&1 || fail "replica $url not SERVING"
done
running="$("$docker" ps -q --filter "label=com.docker.compose.project=$project" --filter status=running | wc -l)"
[ "$running" = 6 ] || fail "expected 6 running containers (postgres, minio, 2 registries, 2 workers), found $running"
say "both replicas SERVING; 6 containers running"

# --- 5. The journey ---------------------------------------------------------------------
events="$work/events-b.jsonl"
pp watch --registry "$b" --json --from 0 >"$events" 2>"$work/watch.err" &
watch_pid=$!
fx=tests/fixtures/llama-micro
patches=(lora-qv lora-all-rslora lora-patterns dora ia3 modules-to-save)
pp base push "$fx/v1" --registry "$a" --name acme/llama-micro --version v1 >/dev/null
for p in "${patches[@]}"; do
  pp patch push "$fx/patches/$p" --registry "$a" --name "acme/$p" --version 1 --base acme/llama-micro:v1 >/dev/null
done
pp base push "$fx/v2" --registry "$a" --name acme/llama-micro --version v2 --parent v1 >/dev/null
say "pushed v1 and ${#patches[@]} patches and published v2 through replica A"

# completed SUBJECT: how many port.completed events replica B's watch has for it.
# (Lines are read raw and parsed leniently: the last one may still be being written.)
completed() { jq -cR --arg s "$1" 'fromjson? | select(.type == "port.completed" and .subject == $s)' "$events" | wc -l; }
wait_completed() { # SUBJECT... : each completed at least once, within 240 s
  local deadline=$(($(date +%s) + 240)) s
  for s in "$@"; do
    until [ "$(completed "$s")" -ge 1 ]; do
      [ "$(date +%s)" -lt "$deadline" ] || fail "no port.completed for $s on replica B in time"
      kill -0 "$watch_pid" 2>/dev/null || fail "watch on replica B exited: $(cat "$work/watch.err")"
      sleep 1
    done
  done
}
subjects=()
for p in "${patches[@]}"; do subjects+=("acme/$p:1@acme/llama-micro:v2"); done
wait_completed "${subjects[@]}"
for s in "${subjects[@]}"; do
  [ "$(completed "$s")" = 1 ] || fail "$s completed $(completed "$s") times"
done
say "replica B's watch saw port.completed once for each of the ${#subjects[@]} ports"

pp compat --registry "$a" --base acme/llama-micro:v2 --json >"$work/compat.json"
[ "$(jq '[.[] | select(.kind == "ported")] | length' "$work/compat.json")" = 3 ] ||
  fail "compat: expected 3 ported pairs: $(cat "$work/compat.json")"
[ "$(jq '[.[] | select(.kind == "incompatible")] | length' "$work/compat.json")" = 3 ] ||
  fail "compat: expected 3 incompatible (dora, ia3, modules_to_save): $(cat "$work/compat.json")"

pp pull acme/llama-micro:v2 --registry "$b" --out "$work/v2" >/dev/null
diff -r "$fx/v2" "$work/v2" >/dev/null || fail "base v2 pulled through replica B differs from the fixture"
pp pull "acme/lora-qv:1@acme/llama-micro:v2" --registry "$b" --out "$work/ported" >/dev/null
[ -s "$work/ported/adapter_model.safetensors" ] || fail "no ported adapter pulled"
say "compat: 3 ported, 3 refused; v2 and the ported lora-qv pulled through replica B (digests verified)"

# --- 6. A worker killed mid-port ----------------------------------------------------------
late="acme/late:1@acme/llama-micro:v2"
# lora-qv with another alpha: new content, so a new port (equal content reuses the port).
cp -r "$fx/patches/lora-qv" "$work/late"
jq '.lora_alpha = 12' "$fx/patches/lora-qv/adapter_config.json" >"$work/late/adapter_config.json"
pp patch push "$work/late" --registry "$b" --name acme/late --version 1 --base acme/llama-micro:v1 >/dev/null
pp request acme/late:1 --registry "$b" --base acme/llama-micro:v2 >/dev/null
deadline=$(($(date +%s) + 120))
until holder="$(jq -rR --arg s "$late" 'fromjson? | select(.type == "port.started" and .subject == $s) | .payload.detail // empty' "$events" | head -n 1)" && [ -n "$holder" ]; do
  [ "$(date +%s)" -lt "$deadline" ] || fail "no port.started for $late"
  sleep 0.2
done
# Worker ids are HOSTNAME-PID; a container's hostname is its short id.
victim="${holder%-*}"
"$docker" kill "$victim" >/dev/null || fail "docker kill $victim (worker $holder)"
[ "$(completed "$late")" = 0 ] || fail "$late completed before its worker was killed (stall too short?)"
say "killed worker $holder (container $victim) holding $late, before it completed"
wait_completed "$late"
sleep $((lease_s + 5)) # a second completion would come after another lease expiry
n="$(completed "$late")"
[ "$n" = 1 ] || fail "$late completed $n times"
by="$(jq -rR --arg s "$late" 'fromjson? | select(.type == "port.started" and .subject == $s) | .payload.detail' "$events" | tail -n 1)"
[ "$by" != "$holder" ] || fail "$late was not re-leased to another worker"
pp watch --registry "$a" --json --from 0 >"$work/events-a.jsonl" 2>/dev/null &
replay=$!
sleep 3
kill "$replay" 2>/dev/null || true
n_a="$(jq -cR --arg s "$late" 'fromjson? | select(.type == "port.completed" and .subject == $s)' "$work/events-a.jsonl" | wc -l)"
[ "$n_a" = 1 ] || fail "replica A's history has $n_a port.completed for $late"
say "$late completed exactly once (re-leased to $by), on both replicas' event history"
