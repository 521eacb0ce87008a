"""Property-based fuzzing of the REST server from the protocol's own OpenAPI spec (schemathesis):
no generated request may get a 5xx, and the server stays ready throughout."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402

from conftest import ServerProcess  # noqa: E402

SPEC = Path(__file__).resolve().parents[3] / "shared" / "specs" / "open_inference_rest.yaml"


def load_spec() -> dict[str, object]:
    # The spec writes path templates as ${NAME}; OpenAPI tools expect {NAME}.
    text = re.sub(r"\$\{(\w+)\}", r"{\1}", SPEC.read_text())
    spec: dict[str, object] = yaml.safe_load(text)
    return spec


if not SPEC.exists():  # the spec lives in the shared checkout beside the project
    pytest.skip(f"protocol spec not found at {SPEC}", allow_module_level=True)

schema = schemathesis.openapi.from_dict(load_spec())


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_generated_request_gets_a_server_error(case, server: ServerProcess) -> None:  # type: ignore[no-untyped-def]
    if case.path_parameters:
        # Pin the path to a served model so the generator exercises bodies, not just 404s.
        case.path_parameters = {"MODEL_NAME": "add", "MODEL_VERSION": "1"}
    response = case.call(base_url=server.url, timeout=10)
    case.validate_response(response, checks=[not_a_server_error])
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200
