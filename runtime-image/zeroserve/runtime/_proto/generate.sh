#!/usr/bin/env bash
# Regenerate the gRPC modules from open_inference_grpc.proto with grpcio-tools:
#   open_inference_grpc_pb2.py / .pyi   the messages (the .pyi is what mypy reads)
#   open_inference_grpc_pb2_grpc.py     the service stub, servicer base and registration function: only the tests
#                                       use it (the server registers its own handlers), so it goes to tests/
#
# Usage: runtime-image/zeroserve/runtime/_proto/generate.sh [PYTHON]   (default: .venv/bin/python)
# PYTHON needs grpcio-tools (pip install grpcio-tools). The generated files are committed, so the
# image and the wheel need no protoc.
#
# Two edits after protoc:
# - the messages are registered in a descriptor pool of their own instead of protobuf's process-wide
#   default pool. kserve and tritonclient each register the same `inference.*` names in the default pool
#   (which is why those two cannot be imported into one process); a private pool lets zeroserve's server
#   live in a process next to either of them. The wire format does not involve the pool;
# - each generated file starts with "# mypy: ignore-errors": mypy --strict runs over the whole package,
#   and generated code is not ours to annotate (the .pyi still types the messages for our code).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"   # runtime-image/: the import root, so imports read zeroserve.runtime._proto
python="${1:-$root/../.venv/bin/python}"
proto=zeroserve/runtime/_proto/open_inference_grpc.proto

cd "$root"
"$python" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. "$proto"

pb2="$here/open_inference_grpc_pb2.py"
grep -q '_descriptor_pool.Default().AddSerializedFile(' "$pb2" || {
  echo "generate.sh: protoc output changed shape; update the private-pool edit" >&2
  exit 1
}
sed -i \
  -e 's/^DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(/POOL = _descriptor_pool.DescriptorPool()  # private: see generate.sh\nDESCRIPTOR = POOL.AddSerializedFile(/' \
  "$pb2"
stub="$root/../tests/open_inference_grpc_pb2_grpc.py"
mv "$here/open_inference_grpc_pb2_grpc.py" "$stub"
for generated in "$pb2" "$here/open_inference_grpc_pb2.pyi" "$stub"; do
  sed -i '1i # mypy: ignore-errors' "$generated"
done
echo "generated: $(cd "$here" && ls open_inference_grpc_pb2*) and tests/open_inference_grpc_pb2_grpc.py"
