"""Every invocation metered, on a real server: the bill on each answer, the counters that add it up, the instance
beside it, and CPU seconds that follow the work done."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from zeroserve.runtime._proto import open_inference_grpc_pb2 as pb

import models as test_models
import open_inference_grpc_pb2_grpc as pb_grpc
from conftest import ServerProcess, start_server, unused_port

METERING = ("zeroserve_billed", "zeroserve_invocation", "zeroserve_instance", "zeroserve_billing")
MLP = {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, int]]:
    root = tmp_path_factory.mktemp("metered")
    test_models.mlp_model(root / "mlp" / "1" / "model.onnx")
    test_models.conv_model(root / "conv" / "1" / "model.onnx", size=64, channels=32, layers=3)
    grpc_port = unused_port()
    server = start_server(
        # One intra-op thread: all of a run's CPU is the calling thread's, which is what is counted.
        ["--model_dir", str(root), "--billing_memory_mib", "2048", "--grpc_port", str(grpc_port),
         "--inline_run_ms", "0", "--intra_op_threads", "1"],
        root / "log",
    )  # fmt: skip
    yield server, grpc_port
    server.stop()


def counters(server: ServerProcess) -> dict[tuple[str, str], float]:
    """(metric sample name, model label) -> value, for the metering families."""
    values: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text):
        if family.name.startswith(METERING):
            for sample in family.samples:
                values[(sample.name, sample.labels.get("model", ""))] = sample.value
    return values


def billed_ms(header: str) -> int:
    entries = {part.split(";")[0].strip(): part for part in header.split(",")}
    return int(entries["billed"].split("dur=")[1])


def test_every_answer_carries_its_bill_and_the_counters_add_them_up(metered: tuple[ServerProcess, int]) -> None:
    server, _ = metered
    before = counters(server)
    total_ms = 0
    for _ in range(5):
        answer = httpx.post(f"{server.url}/v2/models/mlp/infer", json=MLP)
        assert answer.status_code == 200
        total_ms += billed_ms(answer.headers["server-timing"])
    refused = httpx.post(f"{server.url}/v2/models/mlp/infer", json={"inputs": [{"name": "input"}]})
    assert refused.status_code == 400 and billed_ms(refused.headers["server-timing"]) >= 1  # an error is billed too
    total_ms += billed_ms(refused.headers["server-timing"])
    after = counters(server)
    gb = 2048 / 1024  # --billing_memory_mib 2048: 2 GB as Lambda counts them
    assert after[("zeroserve_billed_gb_seconds_total", "mlp")] - before.get(
        ("zeroserve_billed_gb_seconds_total", "mlp"), 0
    ) == pytest.approx(total_ms / 1000 * gb)
    assert after[("zeroserve_invocations_total", "mlp")] - before.get(("zeroserve_invocations_total", "mlp"), 0) == 6
    assert after[("zeroserve_billing_memory_bytes", "")] == 2048 * 2**20


def test_the_instance_is_metered_beside_its_invocations(metered: tuple[ServerProcess, int]) -> None:
    server, _ = metered
    first = counters(server)[("zeroserve_instance_gb_seconds_total", "")]
    time.sleep(1.0)
    second = counters(server)[("zeroserve_instance_gb_seconds_total", "")]
    assert second - first == pytest.approx(2.0 * 1.0, rel=0.25)  # 2 GB for about a second
    assert second >= sum(v for (name, _), v in counters(server).items() if name == "zeroserve_billed_gb_seconds_total")


def test_cpu_seconds_follow_the_work(metered: tuple[ServerProcess, int]) -> None:
    """Twice the work (images per request) gives about twice the CPU seconds."""
    server, _ = metered
    rng = np.random.default_rng(1)

    def cpu_for(batch: int, requests: int = 12) -> float:
        image = rng.standard_normal((batch, 3, 64, 64)).astype(np.float32)
        body = {"inputs": [{"name": "input", "shape": list(image.shape), "datatype": "FP32",
                            "data": image.ravel().tolist()}]}
        before = counters(server).get(("zeroserve_invocation_cpu_seconds_total", "conv"), 0.0)
        for _ in range(requests):
            assert httpx.post(f"{server.url}/v2/models/conv/infer", json=body, timeout=30).status_code == 200
        return counters(server)[("zeroserve_invocation_cpu_seconds_total", "conv")] - before

    cpu_for(1, requests=2)  # warm
    one, two = cpu_for(4), cpu_for(8)
    assert 1.5 < two / one < 2.6, (one, two)


def test_grpc_answers_carry_their_bill_as_trailing_metadata(metered: tuple[ServerProcess, int]) -> None:
    _, grpc_port = metered
    request = pb.ModelInferRequest(
        model_name="mlp",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 16])],
        raw_input_contents=[np.full((1, 16), 0.5, np.float32).tobytes()],
    )
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        _, call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(request, timeout=10)
    assert billed_ms(dict(call.trailing_metadata())["server-timing"]) >= 1


def test_billing_memory_defaults_to_the_memory_limit() -> None:
    from zeroserve.runtime.cgroup import memory_limit, physical_memory
    from zeroserve.runtime.config import RuntimeConfig

    loaded = RuntimeConfig.from_args([], {}).load()
    assert loaded.billing_memory_bytes == (memory_limit() or physical_memory())
    assert RuntimeConfig.from_args(["--billing_memory_mib", "512"], {}).load().billing_memory_bytes == 512 * 2**20


def test_a_cgroup_memory_limit_is_read_from_v2_and_v1_layouts(tmp_path: Path) -> None:
    from zeroserve.runtime.cgroup import memory_limit

    v2 = tmp_path / "v2"
    (v2 / "pod").mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("cpu memory\n")
    (v2 / "memory.max").write_text("max\n")
    (v2 / "pod" / "memory.max").write_text(f"{3 * 2**30}\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/pod\n")
    assert memory_limit(v2, proc_cgroup=proc) == 3 * 2**30
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{2**30}\n")
    assert memory_limit(v1, proc_cgroup=tmp_path / "absent") == 2**30
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert memory_limit(v1, proc_cgroup=tmp_path / "absent") is None
