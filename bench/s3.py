"""S3 for the benchmarks: a moto server (the real S3 API) on 127.0.0.1, and KServe's storage-initializer download.

``moto_server(log_path)`` runs ``python -m moto.server`` in a subprocess and yields the tests' own ``S3Server``
(tests/runtime/conftest.py), imported rather than copied, so that a benchmark counts GetObject requests in moto's
access log exactly as the tests do (``S3Server.object_reads``).

``kserve_download(uri, out_dir, env, log)`` is what KServe's storage-initializer container runs before any
model server starts (``kserve_storage.Storage.download_files``), in a fresh process, as the init container is
one. kserve-storage is a package of its own, kept out of the main virtualenv (it brings every store's client,
and a botocore newer than aiobotocore, which s3fs uses, accepts):

    python3 -m venv bench/.peers/kserve-storage-venv
    bench/.peers/kserve-storage-venv/bin/pip install kserve-storage==0.21.0
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

BENCH = Path(__file__).resolve().parent
STORAGE_PYTHON = BENCH / ".peers" / "kserve-storage-venv" / "bin" / "python"
_TEST_FIXTURES = BENCH.parent / "tests" / "runtime" / "conftest.py"
# What the storage-initializer's entrypoint does with its arguments (source URI, destination folder).
_DOWNLOAD = "import sys; from kserve_storage import Storage; Storage.download_files([sys.argv[1]], [sys.argv[2]])"


def _fixtures() -> ModuleType:
    name = "_zeroserve_tests_runtime_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _TEST_FIXTURES)
        assert spec is not None and spec.loader is not None, _TEST_FIXTURES
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules[name]


def moto_server(log_path: Path) -> contextlib.AbstractContextManager[Any]:
    """A moto S3 server for the duration of the block, stopped by its PID afterwards; yields an ``S3Server``
    (the tests' own, from tests/runtime/conftest.py)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    manager: contextlib.AbstractContextManager[Any] = _fixtures().running_moto_server(log_path)
    return manager


def upload_models(server: Any, bucket: str, paths: Mapping[str, Path]) -> dict[str, str]:
    """Put each model file under ``bucket/<name>/model.onnx``; return name -> ``s3://bucket/<name>`` (a folder)."""
    server.create_bucket(bucket)
    return {name: server.put_tree(bucket, name, {path.name: path.read_bytes()}) for name, path in paths.items()}


def model_reads(server: Any, bucket: str) -> int:
    """GetObject requests on ``bucket`` so far (listings and HEADs are not counted)."""
    return len(server.object_reads(bucket))


def storage_unavailable_reason() -> str | None:
    """Why ``kserve_download`` cannot run (None when it can)."""
    if not STORAGE_PYTHON.exists():
        return f"no kserve-storage virtualenv at {STORAGE_PYTHON} (see bench/s3.py for how to create it)"
    return None


def kserve_download(uri: str, out_dir: Path, env: Mapping[str, str], log_path: Path) -> float:
    """KServe's storage-initializer download of ``uri`` into ``out_dir``, in a fresh process; returns its seconds."""
    with log_path.open("ab") as log:
        started = time.perf_counter()
        done = subprocess.run(
            [str(STORAGE_PYTHON), "-c", _DOWNLOAD, uri, str(out_dir)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, timeout=300,
        )  # fmt: skip
        seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"kserve_storage download of {uri} exited with {done.returncode}; see {log_path}")
    return seconds
