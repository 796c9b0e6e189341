"""gRPC stubs generated from proto/patchport/v1 by scripts/gen-stubs.sh; do not edit."""
