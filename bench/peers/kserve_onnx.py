"""The KServe peer: KServe's Python model server running one ONNX model with onnxruntime.

Usage: python bench/peers/kserve_onnx.py --model_name NAME --model_dir PATH --http_port P --grpc_port G

This is the minimal custom ``kserve.Model`` a KServe user writes for an ONNX model served over the
V2 (Open Inference Protocol) REST API: InferRequest -> ``as_numpy()`` -> ``session.run`` ->
InferResponse, with binary outputs when the request asks for them (``binary_data_output``).
It follows KServe's own built-in servers (sklearnserver, xgbserver): ``load()`` before
``ModelServer.start``, a synchronous ``predict`` that KServe calls on its event loop.

For a fair comparison every per-request log line is off: the latency line
(``enable_latency_logging=False``, same as ``--enable_latency_logging false``), uvicorn's access
log, and the two ``kserve.trace`` lines that KServe's TimingMiddleware writes for every request
whatever that flag says (the ``kserve.trace`` logger is raised to WARNING; the middleware itself
still runs). Everything else is KServe as shipped (gRPC server on, Prometheus histograms on).
Any other KServe flag (``--enable_grpc false``, ``--workers``) passes through.
"""

from __future__ import annotations

import argparse
import logging
import sys
import uuid
from pathlib import Path

# kserve.model_server parses sys.argv at import time; its parser is the documented parent for
# custom servers, so our flags and KServe's are parsed together below.
import kserve
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse
from kserve.model_server import parser as kserve_parser
from kserve.utils.numpy_codec import from_np_dtype


def resolve_model_file(model_dir: str) -> Path:
    """Return the ``.onnx`` file named by ``model_dir`` (a file, or a folder holding one)."""
    path = Path(model_dir)
    if path.is_file():
        return path
    if (path / "model.onnx").is_file():
        return path / "model.onnx"
    found = sorted(path.glob("*.onnx"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one .onnx file in {path}, found {[p.name for p in found]}")
    return found[0]


class OnnxModel(kserve.Model):  # type: ignore[misc]  # kserve ships no type hints
    def __init__(self, name: str, model_dir: str) -> None:
        super().__init__(name)
        self.model_dir = model_dir
        self.session: ort.InferenceSession | None = None

    def load(self) -> bool:
        self.session = ort.InferenceSession(str(resolve_model_file(self.model_dir)), providers=["CPUExecutionProvider"])
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        assert self.session is not None
        feeds = {inp.name: inp.as_numpy() for inp in payload.inputs}
        names = [o.name for o in self.session.get_outputs()]
        results = self.session.run(names, feeds)
        binary = bool(payload.use_binary_outputs)
        outputs = []
        for name, array in zip(names, results, strict=True):
            out = InferOutput(name=name, shape=list(array.shape), datatype=from_np_dtype(array.dtype))
            out.set_data_from_numpy(array, binary_data=binary)
            outputs.append(out)
        return InferResponse(
            response_id=payload.id or str(uuid.uuid4()),
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=binary,
            requested_outputs=payload.request_outputs,
        )


def silence_request_logs() -> None:
    # What uvicorn itself does for access_log=False: with no handlers, its protocol objects skip
    # the access-log path entirely (they test hasHandlers() per connection).
    access = logging.getLogger("uvicorn.access")
    access.handlers = []
    access.propagate = False
    access.setLevel(logging.WARNING)
    # enable_latency_logging=False does not reach the TimingMiddleware, which logs wall and CPU
    # time of every request at INFO on this logger.
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(parents=[kserve_parser], description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True, help="an .onnx file or a folder holding one")
    args, _ = parser.parse_known_args(argv)

    model = OnnxModel(args.model_name, args.model_dir)
    model.load()
    server = kserve.ModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        enable_latency_logging=False,
    )
    silence_request_logs()
    server.start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())
