#!/usr/bin/env bash
# Runs the Python SDK's test suite against the `patchport` debug binary.
#
#   clients/python/scripts/test.sh [pytest args...]
#
# The virtual environment lives in ~/.cache/patchport-py/venv (PATCHPORT_PY_CACHE moves
# it), so CI and developers pay for torch, transformers and PEFT once: it is (re)built
# when pyproject.toml changes, and the SDK itself is reinstalled from this tree on every
# run without touching the network. When the venv cannot be made (no network, no
# python3 -m venv) the Python tests are skipped with the reason, and this exits 0.
# PATCHPORT_BIN picks the binary (default: $CARGO_TARGET_DIR/debug/patchport, built
# when absent).
#
# vLLM pins its own torch, so its resolver test runs in a second venv
# (~/.cache/patchport-py/vllm-venv, about 10 GB): built when PATCHPORT_TEST_VLLM=1, used
# whenever it is there and current, otherwise that test says it is skipped and why.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${PATCHPORT_PY_CACHE:-$HOME/.cache/patchport-py}"
venv="$cache/venv"
python="${PYTHON:-python3}"

skip() {
  echo "python tests skipped: $*"
  exit 0
}

command -v "$python" >/dev/null 2>&1 || skip "no $python on PATH"
stamp="$(sha256sum "$here/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.patchport-stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "python: building the test venv in $venv (torch, transformers, peft; once per pyproject.toml)"
  start=$(date +%s)
  rm -rf "$venv"
  mkdir -p "$cache"
  "$python" -m venv "$venv" >/dev/null 2>&1 || skip "$python -m venv failed (install python3-venv)"
  if ! "$venv/bin/pip" install -q --upgrade pip "setuptools>=77" ||
     ! "$venv/bin/pip" install -q "$here[dev]"; then
    rm -rf "$venv"
    skip "pip could not install clients/python[dev] into $venv (no network to PyPI?)"
  fi
  echo "$stamp" >"$venv/.patchport-stamp"
  echo "python: venv ready in $(( $(date +%s) - start )) s"
fi
# The SDK from this tree, without the network (its dependencies are already there).
"$venv/bin/pip" install -q --no-deps --no-build-isolation --force-reinstall "$here" >/dev/null

if [ -z "${PATCHPORT_BIN:-}" ]; then
  export PATCHPORT_BIN="${CARGO_TARGET_DIR:-$repo/target}/debug/patchport"
  if [ ! -x "$PATCHPORT_BIN" ]; then
    (cd "$repo" && cargo build -p patchport --locked)
  fi
fi
cd "$here"
status=0
"$venv/bin/python" -m pytest -q -rs tests "$@" || status=$?

vvenv="$cache/vllm-venv"
if [ "${PATCHPORT_TEST_VLLM:-}" = 1 ] &&
   { [ ! -x "$vvenv/bin/python" ] || [ "$(cat "$vvenv/.patchport-stamp" 2>/dev/null)" != "$stamp" ]; }; then
  echo "python: building the vLLM venv in $vvenv (once per pyproject.toml)"
  start=$(date +%s)
  rm -rf "$vvenv"
  if "$python" -m venv "$vvenv" >/dev/null 2>&1 &&
     "$vvenv/bin/pip" install -q --upgrade pip "setuptools>=77" &&
     "$vvenv/bin/pip" install -q "$here[vllm]" pytest; then
    echo "$stamp" >"$vvenv/.patchport-stamp"
    echo "python: vLLM venv ready in $(( $(date +%s) - start )) s"
  else
    rm -rf "$vvenv"
    echo "vllm tests skipped: pip could not install clients/python[vllm] (no network to PyPI?)"
  fi
fi
if [ -x "$vvenv/bin/python" ] && [ "$(cat "$vvenv/.patchport-stamp" 2>/dev/null)" = "$stamp" ]; then
  "$vvenv/bin/pip" install -q --no-deps --no-build-isolation --force-reinstall "$here" >/dev/null
  echo "python: the vLLM resolver against vLLM's own classes ($vvenv)"
  "$vvenv/bin/python" -m pytest -q -rs tests/test_vllm.py "$@" || status=$?
else
  echo "vllm tests skipped: no current vLLM venv in $vvenv (PATCHPORT_TEST_VLLM=1 builds it, ~10 GB)"
fi
exit "$status"
