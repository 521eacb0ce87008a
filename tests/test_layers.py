"""The arrows ARCHITECTURE.md allows between the parts, read from the source's own import statements."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "runtime-image" / "zeroserve" / "runtime"
ACTIVATOR = ROOT / "runtime-image" / "zeroserve" / "activator"
PLUGIN = ROOT / "plugin" / "zeroserve"


def imports(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names, type-checking imports included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def ours(path: Path) -> set[str]:
    return {name for name in imports(path) if name.startswith("zeroserve")}


def runtime_module(name: str) -> Path:
    return RUNTIME / f"{name}.py"


@pytest.mark.parametrize(
    "transport", ["infer_endpoint", "rest", "grpc", "invocation", "metrics_server", "http_server", "cloudevents"]
)
def test_transports_never_import_the_process_layer(transport: str) -> None:
    upward = {f"zeroserve.runtime.{name}" for name in ("serve", "app", "lifecycle", "loader", "__main__")}
    assert not ours(runtime_module(transport)) & upward


@pytest.mark.parametrize("codec", ["rest_codec", "grpc_codec", "tensors", "cloudevents"])
def test_codecs_import_only_leaves(codec: str) -> None:
    allowed = {
        "zeroserve.protocol", "zeroserve.runtime", "zeroserve.runtime.settings", "zeroserve.runtime.server_errors",
        "zeroserve.runtime.messages", "zeroserve.runtime.tensors", "zeroserve.runtime.grpc_wire",
        "zeroserve.runtime._proto",
    }
    for name in ours(runtime_module(codec)):
        assert any(name == root or name.startswith(root + ".") for root in allowed), (codec, name)


def test_the_data_plane_imports_no_transport() -> None:
    names = ("rest", "infer_endpoint", "grpc", "rest_codec", "grpc_codec")
    transports = {f"zeroserve.runtime.{name}" for name in names}
    for name in ("dataplane", "placement", "batching", "repository", "model", "loader", "model_manager", "metering"):
        assert not ours(runtime_module(name)) & transports, name


def test_the_activator_uses_only_the_protocol_and_the_sdk_leaf_of_the_server() -> None:
    for path in ACTIVATOR.glob("*.py"):
        for name in ours(path):
            if name.startswith("zeroserve.runtime"):
                assert name.startswith("zeroserve.runtime.otel_sdk"), (path.name, name)


def test_the_server_never_imports_the_client_core_or_the_adapters() -> None:
    allowed = ("zeroserve.protocol", "zeroserve.errors", "zeroserve._version", "zeroserve.runtime")
    for path in RUNTIME.glob("*.py"):
        for name in ours(path):
            assert name.startswith(allowed), (path.name, name)


def test_the_client_core_never_imports_the_server() -> None:
    for path in PLUGIN.rglob("*.py"):
        assert not any(name.startswith(("zeroserve.runtime", "zeroserve.activator")) for name in ours(path)) or (
            path.name == "cli.py"  # `zeroserve serve` and `zeroserve dev` hand over to them, lazily
        ), path
