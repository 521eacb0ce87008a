"""The server process loading its model from object storage: a real S3 API (moto's server) on loopback."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import onnx

import models as test_models
from conftest import start_server

MLP_REQUEST = {"inputs": [{"name": "input", "shape": [2, 16], "datatype": "FP32", "data": [0.25] * 32}]}


def mlp_bytes(tmp_path: Path) -> bytes:
    return test_models.mlp_model(tmp_path / "src" / "model.onnx").read_bytes()


def test_serves_a_model_from_s3_and_reuses_the_download(s3_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bucket = s3_server.create_bucket()
    uri = s3_server.put_tree(bucket, "models/mlp", {"1/model.onnx": mlp_bytes(tmp_path)})
    args = ["--model_name", "mlp", "--model_dir", uri, "--cache_dir", str(tmp_path / "cache")]

    first = start_server(args, tmp_path / "first.log", env=s3_server.aws_env())
    try:
        response = httpx.post(f"{first.url}/v2/models/mlp/versions/1/infer", json=MLP_REQUEST)
        assert response.status_code == 200, response.text
        expected = response.json()["outputs"]
    finally:
        first.stop()
    assert s3_server.object_reads(bucket) == ["models/mlp/1/model.onnx"]

    second = start_server(args, tmp_path / "second.log", env=s3_server.aws_env())
    try:
        response = httpx.post(f"{second.url}/v2/models/mlp/infer", json=MLP_REQUEST)
        assert response.json()["outputs"] == expected
    finally:
        second.stop()
    # The second cold start listed the prefix but read no object bytes.
    assert s3_server.object_reads(bucket) == ["models/mlp/1/model.onnx"]


def test_a_changed_model_is_downloaded_again(s3_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bucket = s3_server.create_bucket()
    source = mlp_bytes(tmp_path)
    uri = s3_server.put_tree(bucket, "m", {"model.onnx": source})
    args = ["--model_name", "m", "--model_dir", uri, "--cache_dir", str(tmp_path / "cache")]
    start_server(args, tmp_path / "a.log", env=s3_server.aws_env()).stop()

    retrained = onnx.load(io.BytesIO(source))
    retrained.graph.initializer[0].float_data[:] = []  # new weights: all ones
    retrained.graph.initializer[0].raw_data = b"\x00\x00\x80\x3f" * (16 * 64)
    s3_server.put(bucket, "m/model.onnx", retrained.SerializeToString())
    server = start_server(args, tmp_path / "b.log", env=s3_server.aws_env())
    try:
        assert httpx.post(f"{server.url}/v2/models/m/infer", json=MLP_REQUEST).status_code == 200
    finally:
        server.stop()
    assert s3_server.object_reads(bucket) == ["m/model.onnx", "m/model.onnx"]


def test_nonexistent_bucket_exits_with_a_clear_message(s3_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    args = ["--model_dir", "s3://no-such-bucket-zeroserve/model.onnx", "--cache_dir", str(tmp_path / "cache")]
    server = start_server(args, tmp_path / "log", env=s3_server.aws_env(), wait_ready=False)
    try:
        server.process.wait(60)
    finally:
        server.stop()
    assert server.process.returncode == 1
    last_line = server.log().strip().splitlines()[-1]
    assert last_line.startswith("zeroserve: ") and "no-such-bucket-zeroserve" in last_line
