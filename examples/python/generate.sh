#!/usr/bin/env bash
# Generates the Python messages and gRPC stubs of orderflow's public API from proto/ into
# generated/ (not committed: rerun after the protos change). grpc_tools.protoc brings protoc
# and the well-known types (google/protobuf/timestamp.proto) itself.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$here/generated"
python3 -m grpc_tools.protoc \
  --proto_path="$here/../../proto" \
  --python_out="$here/generated" \
  --pyi_out="$here/generated" \
  --grpc_python_out="$here/generated" \
  orderflow/v1/orders.proto
