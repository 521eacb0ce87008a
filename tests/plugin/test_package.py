"""The plugin's public surface: what each import loads (in a fresh interpreter), and the exception tree."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

import zeroserve
from zeroserve import errors

FRAMEWORKS = {"numpy", "starlette", "flask", "fastapi", "onnxruntime", "fsspec", "grpc", "orjson", "uvicorn",
              "opentelemetry.sdk"}


def loaded_after(statement: str) -> set[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(json.loads(out))


def test_import_zeroserve_loads_no_http_client() -> None:
    modules = loaded_after("import zeroserve")
    assert not modules & (FRAMEWORKS | {"httpx", "opentelemetry", "typing"}), modules & (FRAMEWORKS | {"httpx"})


def test_the_client_loads_httpx_and_the_otel_api_only() -> None:
    modules = loaded_after("from zeroserve import RemoteModel, AsyncRemoteModel, RetryPolicy\n"
                           "RemoteModel('http://127.0.0.1:1', model='m')")
    assert {"httpx", "opentelemetry.trace"} <= modules
    assert not modules & FRAMEWORKS


@pytest.mark.parametrize(("module", "framework", "absent"), [
    ("zeroserve.starlette", "starlette", {"flask", "numpy", "fastapi"}),
    ("zeroserve.flask", "flask", {"starlette", "numpy", "fastapi"}),
])
def test_each_adapter_loads_only_its_framework(module: str, framework: str, absent: set[str]) -> None:
    modules = loaded_after(f"import {module}")
    assert framework in modules and not modules & absent


def test_the_public_names_resolve() -> None:
    for name in zeroserve.__all__:
        assert getattr(zeroserve, name) is not None
    assert set(zeroserve.__all__) <= set(dir(zeroserve))
    with pytest.raises(AttributeError):
        zeroserve.nothing  # noqa: B018


def test_one_exception_tree() -> None:
    from zeroserve.runtime.server_errors import ServerError

    client_errors = [errors.RequestRejected, errors.Unavailable, errors.CircuitOpen, errors.ColdStartFailed,
                     errors.Unreachable, errors.OutcomeUnknown, errors.DeadlineExceeded, errors.ColdStartTimeout,
                     errors.ProtocolError]
    assert all(issubclass(cls, errors.RemoteModelError) for cls in client_errors)
    assert issubclass(errors.RemoteModelError, errors.ZeroServeError)
    assert issubclass(ServerError, errors.ZeroServeError)
    assert issubclass(errors.ColdStartTimeout, TimeoutError) and issubclass(errors.CircuitOpen, errors.Unavailable)
    assert issubclass(errors.ColdStartFailed, errors.Unavailable) and issubclass(errors.Unreachable, errors.Unavailable)
    assert issubclass(errors.Unreachable, ConnectionError)
    for cls in client_errors:
        assert cls.__name__ in (errors.__doc__ or "")  # the tree is drawn where it is defined


def test_errors_carry_endpoint_attempts_and_status_and_survive_pickling() -> None:
    error = errors.Unavailable("queue full", endpoint="http://m/v2/models/m/infer", attempts=3, last_status=503,
                               retry_after=2.0)
    assert str(error) == "queue full (http://m/v2/models/m/infer: 3 attempts, last status 503)"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.message, copy.endpoint, copy.attempts, copy.last_status, copy.retry_after) == (
        "queue full", "http://m/v2/models/m/infer", 3, 503, 2.0)


def test_a_failed_start_carries_the_servers_reason_and_survives_pickling() -> None:
    from zeroserve.protocol.start import StartState

    start = StartState("failed", reason="INVALID_PROTOBUF", exit_status=1, starts=3, retry_after_s=20.0)
    error = errors.ColdStartFailed("the model service failed to start: INVALID_PROTOBUF",
                                   endpoint="http://m/v2/models/m/infer", probes=2, last_status=503, retry_after=20.0,
                                   start=start)
    assert str(error) == ("the model service failed to start: INVALID_PROTOBUF (http://m/v2/models/m/infer: not sent, "
                          "2 readiness probes, last status 503)")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, copy.exit_status, copy.retry_after, copy.probes, copy.start) == (
        "INVALID_PROTOBUF", 1, 20.0, 2, start)
    assert errors.ColdStartFailed("x", endpoint="e").reason is None  # a marker without details


def test_policies_are_checked_frozen_values() -> None:
    policy = zeroserve.RetryPolicy(deadline=5)
    with pytest.raises(AttributeError):
        policy.deadline = 6  # type: ignore[misc]
    with pytest.raises(ValueError, match="deadline must be positive"):
        zeroserve.RetryPolicy(deadline=0)
    with pytest.raises(ValueError, match="max_attempts"):
        zeroserve.RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="probe_after_idle"):
        zeroserve.ColdStartPolicy(probe_after_idle=-1)
    with pytest.raises(ValueError, match="refused_grace"):
        zeroserve.ColdStartPolicy(refused_grace=float("nan"))
    assert zeroserve.ColdStartPolicy().refused_grace <= 30  # a port nobody holds is named within 30 s
    assert "deadline=300.0" in repr(zeroserve.ColdStartPolicy())


def test_a_model_url_is_checked_and_its_credentials_stay_out_of_errors() -> None:
    with pytest.raises(ValueError, match="http"):
        zeroserve.RemoteModel("ftp://example.com", model="m")
    with pytest.raises(ValueError, match="model"):
        zeroserve.RemoteModel("http://example.com", model="")
    model = zeroserve.RemoteModel("http://user:secret@127.0.0.1:1/base/", model="m")
    assert "secret" not in repr(model)
    with pytest.raises(zeroserve.ColdStartTimeout) as caught:
        model.cold_start = zeroserve.ColdStartPolicy(deadline=0.3, probe_interval=0.05)
        model.infer({"x": np.ones(1)})
    assert caught.value.endpoint == "http://127.0.0.1:1/base/v2/models/m/infer"
    model.close()
