"""Shared runtime fixtures: a real S3-compatible server (moto, in its own process) on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REQUEST_LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d{3})')
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


@dataclass(frozen=True, slots=True)
class Request:
    """One request as moto's access log recorded it."""

    method: str
    path: str  # path and query, e.g. "/bucket/key" or "/bucket?list-type=2&prefix=..."
    status: int


@dataclass
class S3Server:
    """A running moto server and helpers to fill it."""

    endpoint_url: str
    pid: int
    log_path: Path
    _client: Any = field(default=None, repr=False)

    @property
    def client(self) -> Any:
        """A boto3 S3 client bound to this server (its own credentials, independent of the environment)."""
        if self._client is None:
            import boto3

            self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, **CREDENTIALS)
        return self._client

    def aws_env(self) -> dict[str, str]:
        """The environment a process needs to reach this server the standard way (e.g. a server subprocess).

        Pass it on top of ``os.environ``; it also shuts off profiles, config files and instance metadata,
        so the developer's own AWS setup cannot leak in.
        """
        return {
            "AWS_ACCESS_KEY_ID": CREDENTIALS["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": CREDENTIALS["aws_secret_access_key"],
            "AWS_DEFAULT_REGION": CREDENTIALS["region_name"],
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name by default, so tests sharing the server never collide)."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        return name

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def put_tree(self, bucket: str, prefix: str, files: Mapping[str, bytes]) -> str:
        """Upload ``files`` (relative path -> bytes) under ``prefix``; return ``s3://bucket/prefix``."""
        for rel, data in files.items():
            self.put(bucket, f"{prefix.rstrip('/')}/{rel}", data)
        return f"s3://{bucket}/{prefix.rstrip('/')}"

    def requests(self) -> list[Request]:
        """Every request the server has logged so far, oldest first.

        moto logs a request before sending its response, so once a client call returns its line is there.
        """
        found = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            match = _REQUEST_LINE.search(_ANSI.sub("", line))
            if match:
                found.append(Request(match[1], match[2], int(match[3])))
        return found

    def object_reads(self, bucket: str) -> list[str]:
        """Keys of ``bucket`` read with GetObject so far (listings and HEADs are not counted)."""
        keys = []
        for req in self.requests():
            parts = urlsplit(req.path)
            if req.method == "GET" and parts.path.startswith(f"/{bucket}/") and "list-type" not in parts.query:
                keys.append(parts.path[len(bucket) + 2 :])
        return keys


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def running_moto_server(log_path: Path) -> Iterator[S3Server]:
    """moto's S3 server as a subprocess on 127.0.0.1 for the block, its access log at ``log_path``; stopped by
    its PID afterwards. The benchmarks use it too (bench/s3.py)."""
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode}: {log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server not listening on {port} after 30 s") from None
                time.sleep(0.1)
        yield S3Server(f"http://127.0.0.1:{port}", proc.pid, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto S3 server running as a subprocess on 127.0.0.1, for the whole session.

    Each test should make its own bucket with ``s3_server.create_bucket()``. ``s3_server.requests()``
    reads the server's access log, so a test can prove which objects were (not) downloaded.
    """
    with running_moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point the standard AWS environment at ``s3_server`` for one test; return the server.

    The endpoint comes only from ``AWS_ENDPOINT_URL``, as it would in a deployment using an S3-compatible
    store; see ``S3Server.aws_env``. A server subprocess started during the test inherits all of it.
    """
    for name, value in s3_server.aws_env().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    return s3_server
