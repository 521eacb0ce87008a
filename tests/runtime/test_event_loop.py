"""``--event_loop``: a real server on the standard asyncio loop (REST and gRPC), and on uvloop by default."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

from zeroserve.runtime.app import create_app
from zeroserve.runtime.config import RuntimeConfig

from conftest import ServerProcess, start_server, unused_port

ADD = {
    "inputs": [
        {"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
        {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": [10, 20, 30, 40]},
    ]
}


def uses_uvloop(server: ServerProcess) -> bool:
    """Whether uvloop's extension is mapped into the server process (nothing else here imports it)."""
    return "uvloop" in Path(f"/proc/{server.process.pid}/maps").read_text()


@pytest.mark.parametrize(("argv", "uvloop"), [([], True), (["--event_loop", "asyncio"], False)])
def test_the_server_answers_on_the_loop_it_was_given(
    model_repository: Path, tmp_path: Path, argv: list[str], uvloop: bool
) -> None:
    grpc_port = unused_port()
    args = ["--model_dir", str(model_repository), "--grpc_port", str(grpc_port), *argv]
    server = start_server(args, tmp_path / "server.log")
    try:
        answer = httpx.post(f"{server.url}/v2/models/add/versions/1/infer", json=ADD, timeout=10)
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["data"] == [11, 22, 33, 44]
        request = pb.ModelInferRequest(model_name="add", model_version="1")  # version 2 multiplies
        for name in ("a", "b"):
            request.inputs.add(name=name, datatype="FP32", shape=[1, 4])
        request.raw_input_contents.extend([np.float32([1, 2, 3, 4]).tobytes(), np.float32([10, 20, 30, 40]).tobytes()])
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
        np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<f4"), [11, 22, 33, 44])
        assert uses_uvloop(server) is uvloop
    finally:
        server.stop()


@pytest.mark.parametrize("uvloop", [True, False])
def test_rest_asks_for_the_extra_turn_of_the_loop_on_uvloop_only(model_repository: Path, uvloop: bool) -> None:
    # The second turn before a short run (DataPlane.infer) answers uvloop's unfairness to connections when it is
    # saturated; the standard loop does not need it. In process, through the app the server runs, on the loop the
    # app finds itself on (an embedding server may bring its own, whatever --event_loop says).
    app = create_app(RuntimeConfig(model_dir=str(model_repository), event_loop="uvloop" if uvloop else "asyncio"))
    dataplane = app.fallback.state.dataplane
    asked: list[tuple[bool, bool]] = []
    infer = dataplane.infer

    async def recorded_infer(*args: Any, rest: bool = False) -> Any:
        asked.append((rest, dataplane.placement.rest_extra_turn))
        return await infer(*args, rest=rest)

    dataplane.infer = recorded_infer

    async def scenario() -> httpx.Response:
        async with app.fallback.router.lifespan_context(app.fallback):
            for _ in range(400):  # bounded: loading a small model takes well under a second
                if app.fallback.state.repository.all_ready():
                    break
                await asyncio.sleep(0.01)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.post("/v2/models/add/versions/1/infer", json=ADD)

    if uvloop:
        import uvloop as uvloop_module

        answer = uvloop_module.run(scenario())
    else:
        answer = asyncio.run(scenario())
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["data"] == [11, 22, 33, 44]
    assert asked == [(True, uvloop)]  # REST says it is REST; the lifespan found the loop it runs on
