#!/usr/bin/env bash
# Installs the real OpenSSF Model Signing CLI (the `model-signing` package, with pyOpenSSL,
# which its key-based verifier needs) into a venv, and prints the path of its
# `model_signing` executable. The signing tests run it to verify what the registry signs.
#
#   MODEL_SIGNING="$(scripts/model-signing.sh)"
#   "$MODEL_SIGNING" verify key DIR --signature DIR/model.sig --public_key key.pem --ignore-paths DIR/model.sig
#
# The venv lives under ${PATCHPORT_SIGN_DIR:-$HOME/.cache/patchport-sign}/venv (PyPI only,
# installed once; CI reuses the cache). Everything but the path goes to stderr.
set -euo pipefail

dir="${PATCHPORT_SIGN_DIR:-$HOME/.cache/patchport-sign}"
venv="$dir/venv"
version="${PATCHPORT_MODEL_SIGNING_VERSION:-1.1.1}"

if [ ! -x "$venv/bin/model_signing" ] || ! "$venv/bin/python" -c 'import OpenSSL' 2>/dev/null; then
  mkdir -p "$dir"
  echo "model-signing: installing model-signing==$version and pyopenssl into $venv" >&2
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "model-signing==$version" pyopenssl >&2
fi
echo "$venv/bin/model_signing"
