"""The ``kube_stub`` fixture: a stub Kubernetes API server on 127.0.0.1 (see tests/kube_stub.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import kube_stub as stub_api
import pytest


@pytest.fixture
def kube_stub(tmp_path: Path) -> Iterator[stub_api.KubeStub]:
    """A fresh stub API server with Knative and KServe installed, and a kubeconfig pointing at it."""
    stub, stop = stub_api.start(tmp_path)
    try:
        yield stub
    finally:
        stop()
