"""Cold starts that go wrong, and services that are not cold at all, with real processes and real clients: a model
server whose model failed to load, a front that answers the start-state contract as ``zeroserve dev`` will, a port
with nothing listening, a host that does not resolve, a TLS server whose certificate fails verification.
Each names its cause, in time."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import http.server
import ipaddress
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from flask import Flask
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.plugin.conftest import uvicorn_server, wait_until, waitress_server
from zeroserve import (
    AsyncRemoteModel,
    ColdStartFailed,
    ColdStartPolicy,
    ColdStartTimeout,
    RemoteModel,
    Unreachable,
)
from zeroserve.flask import ZeroServe
from zeroserve.protocol.start import START_HEADER, StartState, retry_after_value
from zeroserve.starlette import mount_model

from conftest import ServerProcess, start_server, unused_port

X = np.ones((1, 4), np.float32)
REASON = "zeroserve: cannot load model /models/mlp.onnx: INVALID_PROTOBUF: Protobuf parsing failed."


def call(client: str, url: str, inputs: dict[str, Any] | None = None, **options: Any) -> tuple[BaseException, float]:
    """Call ``infer`` with the sync or async client; return the error it raised and the seconds it took."""
    inputs = inputs if inputs is not None else {"x": X}
    started = time.monotonic()
    if client == "sync":
        with RemoteModel(url, model="m", **options) as model, pytest.raises(Exception) as caught:
            model.infer(inputs)
    else:
        async def run() -> None:
            async with AsyncRemoteModel(url, model="m", **options) as model:
                await model.infer(inputs)

        with pytest.raises(Exception) as caught:
            asyncio.run(run())
    return caught.value, time.monotonic() - started


# --- a model server whose model failed to load (--no-exit_on_error) ---

@pytest.fixture(scope="module")
def failed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("corrupt")
    (folder / "model.onnx").write_bytes(b"this is not a protobuf")
    server = start_server(["--model_name", "m", "--model_dir", str(folder / "model.onnx"), "--no-exit_on_error"],
                          folder / "server.log", wait_ready=False)
    wait_until(lambda: "model loading failed" in server.log())
    yield server
    server.stop()


@pytest.mark.parametrize("client", ["sync", "async"])
@pytest.mark.parametrize("inputs", [{"x": X}, {"x": [[1.0, 2.0]]}], ids=["array", "plain list"])
def test_a_model_that_failed_to_load_is_named_at_once(failed_server: ServerProcess, client: str,
                                                      inputs: dict[str, Any]) -> None:
    error, took = call(client, failed_server.url, inputs)  # default policies
    assert isinstance(error, ColdStartFailed), error
    assert took < 5.0
    assert "Protobuf parsing failed" in error.message and error.reason is not None
    assert "Protobuf parsing failed" in error.reason
    assert error.start is not None and error.start.state == "failed" and error.last_status == 503
    assert error.endpoint.startswith(f"{failed_server.url}/v2/models/m")  # /infer, or the metadata it needs


@pytest.mark.parametrize("client", ["sync", "async"])
def test_a_model_that_can_never_start_behind_zeroserve_dev_is_named(dev_front: Callable[..., Any], tmp_path: Path,
                                                                  client: str) -> None:
    (tmp_path / "model.onnx").write_bytes(b"this is not a protobuf")
    front = dev_front("--model_name", "m", "--model_dir", str(tmp_path / "model.onnx"))
    error, took = call(client, front.url)  # default policies
    assert isinstance(error, ColdStartFailed), error
    assert took < 30.0
    assert error.reason is not None and "Protobuf parsing failed" in error.reason
    assert error.exit_status == 1 and error.retry_after is not None


# --- a front answering the start-state contract as `zeroserve dev` does: a process starting, then failed ---

class ContractFront:
    """A tiny real Starlette app on loopback: every request meets ``loading`` (phase ``process``) for
    ``loading_for`` seconds after the first one, then ``failed`` with an exit status and a backoff."""

    def __init__(self, loading_for: float = 1.0, progress: bool = False, fails: bool = True) -> None:
        self.loading_for = loading_for
        self.progress = progress
        self.fails = fails
        self.first: float | None = None
        self.paths: list[str] = []
        self.app = Starlette(routes=[Route("/{path:path}", self.answer, methods=["GET", "POST"])])

    async def answer(self, request: Request) -> Response:
        self.paths.append(request.url.path)
        now = time.monotonic()
        self.first = self.first if self.first is not None else now
        elapsed = now - self.first
        if elapsed < self.loading_for or not self.fails:
            fetched = int(elapsed * 2**20)
            state = (StartState("loading", phase="fetch", elapsed_s=elapsed, done_bytes=fetched,
                                total_bytes=64 * 2**20, bytes_per_s=2.0**20) if self.progress
                     else StartState("loading", phase="process", elapsed_s=elapsed))
            return self.respond(request, state, "the model server is starting", 1.0)
        state = StartState("failed", reason=REASON, exit_status=1, starts=2, retry_after_s=10.0)
        return self.respond(request, state, f"the model server failed to start: {REASON}", 10.0)

    @staticmethod
    def respond(request: Request, state: StartState, error: str, retry_after: float) -> Response:
        headers = {START_HEADER: state.state, "retry-after": retry_after_value(retry_after)}
        if request.url.path.endswith("/ready"):
            return JSONResponse({"ready": False, "start": state.to_json()}, 503, headers)
        return JSONResponse({"error": error, "start": state.to_json()}, 503, headers)


@pytest.mark.parametrize("client", ["sync", "async"])
def test_a_start_that_fails_behind_the_front_is_named_with_its_exit_status(client: str,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="zeroserve.client")
    front = ContractFront(loading_for=1.0)
    with uvicorn_server(front.app) as url:
        error, took = call(client, url)  # default policies
    assert isinstance(error, ColdStartFailed), error
    assert 1.0 <= took < 5.0
    assert REASON in error.message and "exit status 1" in error.message
    assert (error.reason, error.exit_status, error.retry_after) == (REASON, 1, 10.0)
    assert error.probes >= 2 and error.attempts == 0  # the payload never left: the probe saw it all
    waits = [record.getMessage() for record in caplog.records if record.name == "zeroserve.client"]
    assert waits and "process" in waits[0]  # the wait showed itself while it lasted


@pytest.mark.slow
def test_a_slow_start_shows_its_progress_and_times_out_with_it(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="zeroserve.client")
    front = ContractFront(progress=True, fails=False)
    with uvicorn_server(front.app) as url:
        error, took = call("sync", url, cold_start=ColdStartPolicy(deadline=6.0))
    assert isinstance(error, ColdStartTimeout), error
    assert 6.0 <= took < 9.0
    assert "progress: fetch" in error.message and "of 64.0 MiB" in error.message
    waits = [record for record in caplog.records if record.name == "zeroserve.client"]
    assert 2 <= len(waits) <= 3 and all(record.levelno == logging.INFO for record in waits)  # at 0 and 5 s
    assert "MiB/s" in waits[-1].getMessage()


def test_mounted_routes_pass_a_failed_start_on_to_their_callers() -> None:
    front = ContractFront(loading_for=0.0)
    with uvicorn_server(front.app) as model_url:
        host = Starlette()
        mount_model(host, "/predict", AsyncRemoteModel(model_url, model="m"))
        flask_app = Flask(__name__)
        extension = ZeroServe(flask_app, url=model_url, model="m", prefix="/predict")
        try:
            with uvicorn_server(host) as starlette_url, waitress_server(flask_app) as flask_url:
                for url in (starlette_url, flask_url):
                    for path, body in (("/predict", b'{"x": [[1, 2]]}'), ("/predict/v2/models/m/infer", b"{}")):
                        answer = httpx.post(url + path, content=body, timeout=30)
                        assert answer.status_code == 503, (url, path, answer.text)
                        assert answer.headers[START_HEADER] == "failed" and answer.headers["retry-after"] == "10"
                        content = answer.json()
                        assert REASON in content["error"] and content["start"]["exit_status"] == 1
                        assert content["start"]["reason"] == REASON and "127.0.0.1" not in content["error"]
        finally:
            extension.close(flask_app)


def test_a_route_that_will_not_wait_says_the_service_is_starting() -> None:
    front = ContractFront(fails=False)
    with uvicorn_server(front.app) as model_url:
        host = Starlette()
        # a grace that outlasts the first probe (so the route knows what the service said), not the start
        mount_model(host, "/predict", AsyncRemoteModel(model_url, model="m"), when_cold="reject", cold_grace=2.0)
        with uvicorn_server(host) as url:
            answer = httpx.post(f"{url}/predict", content=b'{"x": [[1, 2]]}', timeout=30)
    assert answer.status_code == 503 and answer.headers[START_HEADER] == "loading"
    assert answer.headers["retry-after"] == "1"
    content = answer.json()
    assert content["start"]["state"] == "loading" and content["start"]["phase"] == "process"
    assert content["error"].startswith("the model service is starting (process")


# --- not a cold start: fail fast, naming the cause ---

@pytest.mark.parametrize("client", ["sync", "async"])
def test_nothing_listening_is_named_after_the_refused_grace(client: str) -> None:
    port = unused_port()
    error, took = call(client, f"http://127.0.0.1:{port}", cold_start=ColdStartPolicy(refused_grace=1.0))
    assert isinstance(error, Unreachable), error
    assert 1.0 <= took < 4.0
    assert error.message.startswith(f"nothing is listening at 127.0.0.1:{port}")


@pytest.mark.slow
def test_nothing_listening_with_default_policies_fails_within_30_s() -> None:
    error, took = call("sync", f"http://127.0.0.1:{unused_port()}")
    assert isinstance(error, Unreachable) and isinstance(error, ConnectionError), error
    assert took < 30.0


def test_a_server_restarting_within_the_grace_is_waited_for(add_repository: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.plugin.conftest import start_server_on

    port = unused_port()
    starter = threading.Timer(1.0, lambda: servers.append(start_server_on(
        port, ["--model_dir", str(add_repository)], tmp_path / "late.log", monkeypatch, wait_ready=False)))
    servers: list[ServerProcess] = []
    starter.start()
    try:
        with RemoteModel(f"http://127.0.0.1:{port}", model="add", version="1",
                         cold_start=ColdStartPolicy(refused_grace=20.0, probe_interval=0.1)) as model:
            outputs = model.infer({"a": X, "b": X})
        assert outputs["sum"].tolist() == [[2.0] * 4]
    finally:
        starter.join()
        for server in servers:
            server.stop()


@pytest.mark.parametrize("client", ["sync", "async"])
def test_a_host_that_does_not_resolve_fails_fast(client: str) -> None:
    error, took = call(client, "http://no-such-host.invalid:8080")  # default policies
    assert isinstance(error, Unreachable), error
    assert took < 5.0
    assert "the host no-such-host.invalid does not resolve" in error.message


@contextlib.contextmanager
def tls_server(tmp_path: Path) -> Iterator[tuple[str, ssl.SSLContext]]:
    """A V2-ish readiness endpoint over TLS on 127.0.0.1 with a self-signed certificate; yields its URL and a
    client context that trusts the certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"ready": True}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", ssl.create_default_context(cafile=str(cert_path))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.mark.parametrize("client", ["sync", "async"])
def test_a_tls_certificate_that_fails_verification_fails_fast(client: str, tmp_path: Path) -> None:
    with tls_server(tmp_path) as (url, trusting):
        error, took = call(client, url)  # default policies, the system's trust store
        with RemoteModel(url, model="m", transport=httpx.HTTPTransport(verify=trusting)) as trusted:
            assert trusted.ready()  # the same server, its certificate trusted: reachable
    assert isinstance(error, Unreachable), error
    assert took < 5.0
    assert "TLS certificate of 127.0.0.1:" in error.message and "fails verification" in error.message


def test_a_mounted_route_answers_an_unreachable_service_with_502() -> None:
    host = Starlette()
    mount_model(host, "/predict", AsyncRemoteModel("http://no-such-host.invalid:8080", model="m"))
    with uvicorn_server(host) as url:
        answer = httpx.post(f"{url}/predict", content=b'{"x": [[1]]}', timeout=30)
    assert answer.status_code == 502 and "does not resolve" in answer.json()["error"]


