"""zeroserve.runtime.storage against real parts: the local disk, moto S3 in a subprocess, a loopback
http.server. Nothing is mocked; downloads are counted from the servers' own request logs."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from zeroserve.runtime.server_errors import StorageError
from zeroserve.runtime.storage import fetch

MiB = 2**20


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- local ----------------------------------------------------------------------------------------


def test_local_file_is_used_in_place(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"onnx")
    result = fetch(str(model), tmp_path / "cache")
    assert result.path == model
    assert (result.cache_hit, result.bytes_fetched) == (True, 0)
    assert not (tmp_path / "cache").exists()


def test_local_folder_is_used_in_place(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(b"onnx")
    assert fetch(str(tmp_path / "m"), tmp_path / "cache").path == tmp_path / "m"


def test_file_uri(tmp_path: Path) -> None:
    model = tmp_path / "a dir" / "model.onnx"
    model.parent.mkdir()
    model.write_bytes(b"onnx")
    result = fetch(model.as_uri(), tmp_path / "cache")  # as_uri() percent-encodes the space
    assert result.path == model
    assert result.cache_hit


def test_missing_local_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "model.onnx"
    with pytest.raises(StorageError, match=r"model URI '.*nope/model.onnx' does not exist"):
        fetch(str(missing), tmp_path / "cache")
    with pytest.raises(StorageError, match="does not exist"):
        fetch(missing.as_uri(), tmp_path / "cache")


def test_unknown_scheme(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"unsupported scheme 'foo'.*s3://.*gs://.*https://"):
        fetch("foo://bucket/model.onnx", tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed here")
def test_missing_backend_names_the_extra(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"pip install 'zeroserve\[gcs\]'"):
        fetch("gs://bucket/model.onnx", tmp_path)


def test_import_loads_no_fsspec() -> None:
    code = (
        "import sys, zeroserve.runtime.storage\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'fsspec', 's3fs', 'gcsfs', 'adlfs', 'aiohttp', 'botocore', 'aiobotocore'})\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- s3 -------------------------------------------------------------------------------------------


def test_s3_single_file(s3_env: Any, tmp_path: Path) -> None:
    bucket = s3_env.create_bucket()
    data = os.urandom(1000)
    s3_env.put(bucket, "models/model.onnx", data)
    result = fetch(f"s3://{bucket}/models/model.onnx", tmp_path)
    assert result.path.name == "model.onnx"
    assert result.path.is_relative_to(tmp_path / "models")
    assert result.path.read_bytes() == data
    assert (result.cache_hit, result.bytes_fetched) == (False, 1000)


def test_s3_prefix_is_mirrored(s3_env: Any, tmp_path: Path) -> None:
    bucket = s3_env.create_bucket()
    tree = {
        "model.onnx": b"graph",
        "1/weights.bin": os.urandom(3000),
        "1/sub/empty": b"",
        "config.json": b"{}",
    }
    s3_env.put(bucket, "other/ignored.txt", b"not part of the model")
    uri = s3_env.put_tree(bucket, "models/resnet", tree)
    for spelling in (uri, uri + "/"):
        result = fetch(spelling, tmp_path)
        assert result.path.is_dir()
        assert read_tree(result.path) == tree
    assert not any(p.name == "manifest.json" for p in result.path.rglob("*"))


def test_second_fetch_reads_no_object_bytes(s3_env: Any, tmp_path: Path) -> None:
    bucket = s3_env.create_bucket()
    uri = s3_env.put_tree(bucket, "m", {"model.onnx": os.urandom(5000), "a/b.bin": os.urandom(10)})
    first = fetch(uri, tmp_path)
    assert (first.cache_hit, first.bytes_fetched) == (False, 5010)
    reads = len(s3_env.object_reads(bucket))
    assert reads == 2

    second = fetch(uri, tmp_path)
    assert (second.cache_hit, second.bytes_fetched) == (True, 0)
    assert second.path == first.path
    # The server's own log: listing requests only, not one more GetObject.
    assert len(s3_env.object_reads(bucket)) == reads

    single = f"s3://{bucket}/m/model.onnx"
    fetch(single, tmp_path)
    reads = len(s3_env.object_reads(bucket))
    assert fetch(single, tmp_path).cache_hit
    assert len(s3_env.object_reads(bucket)) == reads


def test_changed_object_is_downloaded_again(s3_env: Any, tmp_path: Path) -> None:
    bucket = s3_env.create_bucket()
    uri = f"s3://{bucket}/model.onnx"
    s3_env.put(bucket, "model.onnx", b"version one")
    first = fetch(uri, tmp_path)
    s3_env.put(bucket, "model.onnx", b"version two")  # same size, new ETag
    second = fetch(uri, tmp_path)
    assert not second.cache_hit
    assert second.path != first.path
    assert second.path.read_bytes() == b"version two"
    assert first.path.read_bytes() == b"version one"  # the old entry is left alone, not rewritten


@pytest.mark.parametrize("damage", ["truncate", "delete_file", "delete_manifest", "corrupt_manifest"])
def test_incomplete_entry_is_rebuilt(s3_env: Any, tmp_path: Path, damage: str) -> None:
    bucket = s3_env.create_bucket()
    tree = {"model.onnx": os.urandom(4096), "extra/w.bin": os.urandom(100)}
    uri = s3_env.put_tree(bucket, "m", tree)
    first = fetch(uri, tmp_path)
    manifest = first.path.parent / "manifest.json"
    assert manifest.is_file()
    if damage == "truncate":
        os.truncate(first.path / "model.onnx", 100)
    elif damage == "delete_file":
        (first.path / "extra" / "w.bin").unlink()
    elif damage == "delete_manifest":
        manifest.unlink()
    else:
        manifest.write_text("{not json")

    second = fetch(uri, tmp_path)
    assert (second.cache_hit, second.bytes_fetched) == (False, 4196)
    assert read_tree(second.path) == tree
    assert fetch(uri, tmp_path).cache_hit


def test_concurrent_fetches_download_once(s3_env: Any, tmp_path: Path) -> None:
    bucket = s3_env.create_bucket()
    uri = s3_env.put_tree(bucket, "m", {"model.onnx": os.urandom(2 * MiB)})
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda _: fetch(uri, tmp_path), range(3)))
    # The entry lock makes the others wait for the first download, then find the entry complete.
    assert sorted(r.cache_hit for r in results) == [False, True, True]
    assert s3_env.object_reads(bucket) == ["m/model.onnx"]
    assert {r.path for r in results} == {results[0].path}


def test_large_file_is_fetched_in_ranges(s3_env: Any, tmp_path: Path) -> None:
    bucket = s3_env.create_bucket()
    data = os.urandom(40 * MiB + 123)  # not a multiple of the chunk: the last range is short
    s3_env.put(bucket, "big.onnx", data)
    result = fetch(f"s3://{bucket}/big.onnx", tmp_path, chunk_size=4 * MiB, max_workers=4)
    assert result.bytes_fetched == len(data)
    assert result.path.read_bytes() == data
    assert s3_env.object_reads(bucket) == ["big.onnx"] * 11
    assert not list(result.path.parent.glob(".*.part"))


def test_s3_goes_through_botocore_alone(s3_env: Any, tmp_path: Path) -> None:
    # The cold-start path: s3fs, aiobotocore, aiohttp and fsspec stay unimported (they cost ~0.5 s more).
    bucket = s3_env.create_bucket()
    uri = s3_env.put_tree(bucket, "m", {"model.onnx": b"onnx", "sub/extra.bin": b"12"})
    code = (
        "import sys; from pathlib import Path; from zeroserve.runtime.storage import fetch\n"
        f"result = fetch({uri!r}, Path({str(tmp_path)!r}))\n"
        "assert (result.path / 'model.onnx').read_bytes() == b'onnx', result\n"
        "assert (result.path / 'sub' / 'extra.bin').read_bytes() == b'12', result\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'fsspec', 's3fs', 'aiobotocore', 'aiohttp'})\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env={**os.environ, **s3_env.aws_env()})


def test_endpoint_from_aws_endpoint_url_s3(s3_env: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env.endpoint_url)
    bucket = s3_env.create_bucket()
    s3_env.put(bucket, "model.onnx", b"onnx")
    assert fetch(f"s3://{bucket}/model.onnx", tmp_path).path.read_bytes() == b"onnx"


def test_endpoint_from_storage_options(s3_env: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    bucket = s3_env.create_bucket()
    s3_env.put(bucket, "model.onnx", b"onnx")
    result = fetch(f"s3://{bucket}/model.onnx", tmp_path, storage_options={"endpoint_url": s3_env.endpoint_url})
    assert result.path.read_bytes() == b"onnx"


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("no-such-bucket-zs/model.onnx", "does not exist.*bucket does not exist"),
        ("{bucket}/no/such/model.onnx", "does not exist"),
        ("{bucket}/no/such/prefix/", "does not exist"),
        ("{bucket}/empty", "does not exist"),  # holds only a zero-byte "empty/" folder marker
    ],
)
def test_s3_missing(s3_env: Any, tmp_path: Path, path: str, reason: str) -> None:
    bucket = s3_env.create_bucket()
    s3_env.put(bucket, "present.onnx", b"x")
    s3_env.put(bucket, "empty/", b"")
    uri = "s3://" + path.format(bucket=bucket)
    with pytest.raises(StorageError, match=reason) as info:
        fetch(uri, tmp_path)
    assert repr(uri) in str(info.value)
    assert "Traceback" not in str(info.value)


def test_s3_unsafe_key_is_refused(s3_env: Any, tmp_path: Path) -> None:
    bucket = s3_env.create_bucket()
    s3_env.put(bucket, "m/../../escape.onnx", b"x")
    s3_env.put(bucket, "m/ok.onnx", b"x")
    with pytest.raises(StorageError, match="not a safe file name"):
        fetch(f"s3://{bucket}/m", tmp_path / "cache")
    assert not (tmp_path / "escape.onnx").exists()


def test_s3_network_failure(s3_env: Any, tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port that was just free: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},  # fail in seconds
    }
    with pytest.raises(StorageError, match=r"cannot read model URI 's3://bucket/model.onnx': network failure"):
        fetch("s3://bucket/model.onnx", tmp_path, storage_options=options)


# --- http -----------------------------------------------------------------------------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder and records each request. Like many simple hosts it ignores Range."""

    def log_message(self, format: str, *args: Any) -> None:
        self.server.seen.append((self.command, self.path))  # type: ignore[attr-defined]

    def send_head(self) -> Any:
        if self.path.startswith("/private/"):
            self.send_error(403)
            return None
        return super().send_head()


class _RangeHandler(_Handler):
    """Also answers single ``Range: bytes=A-B`` requests with 206, as object stores and CDNs do."""

    def do_GET(self) -> None:
        spec = self.headers.get("Range")
        if spec is None:
            return super().do_GET()
        data = Path(self.translate_path(self.path)).read_bytes()
        first, _, last = spec.removeprefix("bytes=").partition("-")
        body = data[int(first) : int(last) + 1]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {first}-{int(first) + len(body) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return None


@dataclass(frozen=True)
class HttpSite:
    base: str  # URL of the served folder
    root: Path  # the folder
    seen: list[tuple[str, str]]  # (method, path) of each request, in order
    ranges: bool  # whether the server honours Range

    def gets(self) -> int:
        return [method for method, _ in self.seen].count("GET")


@pytest.fixture(params=[_Handler, _RangeHandler], ids=["no-ranges", "ranges"])
def http_site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HttpSite]:
    """A loopback http.server in a thread serving a temporary folder, with and without Range support."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(request.param, directory=str(root)))
    server.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        yield HttpSite(base, root, server.seen, request.param is _RangeHandler)  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_http_file_is_fetched_and_cached(http_site: HttpSite, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 7)
    (http_site.root / "model.onnx").write_bytes(data)
    first = fetch(f"{http_site.base}/model.onnx", tmp_path / "cache", chunk_size=MiB)
    assert first.path.read_bytes() == data
    # Each byte crosses the wire once. A server that ignores Range sends the whole file to the first
    # (probe) read and is asked nothing more; one that honours it gets four range requests.
    assert (first.cache_hit, first.bytes_fetched) == (False, len(data))
    assert http_site.gets() == (4 if http_site.ranges else 1)

    second = fetch(f"{http_site.base}/model.onnx", tmp_path / "cache", chunk_size=MiB)
    assert (second.cache_hit, second.bytes_fetched, second.path) == (True, 0, first.path)
    assert http_site.gets() == (4 if http_site.ranges else 1)  # only HEADs since


def test_http_errors(http_site: HttpSite, tmp_path: Path) -> None:
    base, root = http_site.base, http_site.root
    (root / "private").mkdir()
    (root / "private" / "model.onnx").write_bytes(b"secret")
    with pytest.raises(StorageError, match="does not exist"):
        fetch(f"{base}/missing.onnx", tmp_path)
    with pytest.raises(StorageError, match="access denied"):
        fetch(f"{base}/private/model.onnx", tmp_path)
    with pytest.raises(StorageError, match="must name a single file"):
        fetch(f"{base}/", tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/model.onnx"
    with pytest.raises(StorageError, match="network failure"):
        fetch(closed, tmp_path)
