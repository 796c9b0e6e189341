#!/usr/bin/env bash
# Regenerates the gRPC stubs of the Python SDK from proto/ (the one source of truth).
#
#   clients/python/scripts/gen-stubs.sh [OUT_DIR]
#
# Writes src/patchport/v1/*_pb2.py, *_pb2.pyi and *_pb2_grpc.py (or the same tree under
# OUT_DIR, which the stub test uses to compare the committed stubs with fresh ones). Needs
# grpcio-tools at the version pinned in pyproject.toml's `dev` extra (`pip install -e
# 'clients/python[dev]'`); PYTHON picks the interpreter (default: python3).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${1:-$here/src}"
python="${PYTHON:-python3}"

"$python" - <<'PY'
import sys
try:
    import grpc_tools  # noqa: F401
except ImportError:
    sys.exit("gen-stubs.sh: grpcio-tools is not installed (pip install 'clients/python[dev]')")
PY
wkt="$("$python" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')"

mkdir -p "$out/patchport/v1"
rm -f "$out"/patchport/v1/*_pb2.py "$out"/patchport/v1/*_pb2.pyi "$out"/patchport/v1/*_pb2_grpc.py
(
  cd "$repo/proto"
  "$python" -m grpc_tools.protoc -I . -I "$wkt" \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    patchport/v1/*.proto
)
cat > "$out/patchport/v1/__init__.py" <<'PY'
"""gRPC stubs generated from proto/patchport/v1 by scripts/gen-stubs.sh; do not edit."""
PY
