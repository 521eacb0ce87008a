"""Import budget: cold start is the product, so what each entry point loads is pinned here.

Each check runs in a fresh interpreter; module counts (not times) keep it deterministic.
Timings live in bench/importtime.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ["numpy", "onnxruntime", "starlette", "uvicorn", "fsspec", "grpc", "s3fs", "gcsfs", "adlfs", "flask",
         "orjson", "opentelemetry.sdk"]


def loaded_after(statement: str) -> set[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(json.loads(out))


def top_level(modules: set[str]) -> set[str]:
    return {name for name in HEAVY if name in modules}


@pytest.mark.parametrize(
    "statement",
    ["import zeroserve", "import zeroserve.cli", "import zeroserve.errors", "import zeroserve.protocol.binary",
     "import zeroserve.protocol.dtypes"],
)
def test_client_core_loads_nothing_heavy(statement: str) -> None:
    assert top_level(loaded_after(statement)) == set()


def test_runtime_package_and_entrypoint_are_light() -> None:
    assert top_level(loaded_after("import zeroserve.runtime, zeroserve.runtime.__main__")) == set()
    assert top_level(loaded_after("import zeroserve.runtime.config, zeroserve.runtime.providers")) == set()
    assert top_level(loaded_after("import zeroserve.runtime.storage")) == set()


def test_server_start_path_imports_only_what_it_uses() -> None:
    modules = loaded_after("import zeroserve.runtime.serve, zeroserve.runtime.app")
    # The REST stack and numpy are needed to answer; ONNX Runtime loads with the first model,
    # fsspec and cloud backends only for a remote URI, gRPC only when enabled.
    assert top_level(modules) == {"numpy", "starlette", "orjson"}
    assert len(modules) < 420, f"{len(modules)} modules on the start path"


def test_rest_only_server_never_imports_grpc() -> None:
    build = "from zeroserve.runtime.app import create_app\nfrom zeroserve.runtime.config import RuntimeConfig\n"
    rest = loaded_after(build + "create_app(RuntimeConfig.from_args([], {}))")
    assert "grpc" not in top_level(rest)
    both = loaded_after(build + "create_app(RuntimeConfig.from_args(['--enable_grpc'], {}))")
    assert "grpc" in top_level(both)  # the check above can see grpc when it is there


def test_grpc_only_server_skips_the_rest_stack() -> None:
    modules = loaded_after("import zeroserve.runtime.serve, zeroserve.runtime.grpc")
    assert top_level(modules) == {"grpc", "numpy"}


def test_the_codecs_load_only_the_leaves_they_use() -> None:
    """A codec depends on settings, messages, errors and tensor checks, never on the model, config or threads."""
    ours = {name for name in loaded_after("import zeroserve.runtime.rest_codec") if name.startswith("zeroserve.")}
    assert ours == {
        "zeroserve.errors", "zeroserve.protocol", "zeroserve.protocol.binary", "zeroserve.protocol.dtypes",
        "zeroserve.protocol.start", "zeroserve.runtime", "zeroserve.runtime.messages",
        "zeroserve.runtime.rest_codec", "zeroserve.runtime.server_errors", "zeroserve.runtime.settings",
        "zeroserve.runtime.tensors",
    }
