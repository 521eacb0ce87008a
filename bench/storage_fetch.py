"""Time a model download: naive fsspec read vs ``zeroserve.runtime.storage.fetch``, cold and warm.

Run: ``.venv/bin/python bench/storage_fetch.py [--size-mib 256] [--repeat 3]``

It writes one random object, then times against each server, in the same run:

  naive   ``fs.open(path).read()`` written to a file: one sequential stream, what plain fsspec code does
  cold    ``fetch()`` into an empty cache: parallel byte ranges written in place with os.pwrite
  warm    ``fetch()`` again: a cache hit, which only lists the object

Servers: moto in server mode (S3 API) in a subprocess on 127.0.0.1, and, as a control, a small
range-capable http.server in another subprocess that reads only the requested bytes.

What it shows: that the range/pwrite path costs nothing over a plain read where ranges are cheap (the
control), and that a warm start costs one metadata round trip plus client set-up, whatever the size.

What it does not show: real cloud throughput. Parallel ranges pay off because a cloud store throttles
each connection and spreads an object over many nodes; on loopback there is no per-connection limit and
no latency, and both ends share 2 CPUs here. moto is also a poor range server: it reads and copies the
whole object for every request, range or not (0.2 s for a 1 KiB range of a 256 MiB object on this box),
so on moto many ranges of a big object cost more than one full read. Quote numbers from a real bucket.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

MiB = 2**20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(proc: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server {proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                _stop(proc)
                raise RuntimeError(f"server {proc.args!r} not listening after 30 s") from None
            time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def _timed(repeat: int, prepare: Callable[[], None], run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        prepare()
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves files of one folder with single-range support, reading only the bytes asked for (os.pread)."""

    root = Path(".")

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, *, body: bool) -> None:
        path = self.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        first, last = 0, size - 1
        spec = self.headers.get("Range")
        if spec:
            a, _, b = spec.removeprefix("bytes=").partition("-")
            first, last = int(a), min(int(b), size - 1)
        self.send_response(206 if spec else 200)
        if spec:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("ETag", f'"{path.stat().st_mtime_ns}"')
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if body:
            fd = os.open(path, os.O_RDONLY)
            try:
                self.wfile.write(os.pread(fd, last - first + 1, first))
            finally:
                os.close(fd)


def _measure(
    uri: str, naive_path: str, protocol: str, cache: Path, out: Path, args: argparse.Namespace
) -> list[tuple[str, float]]:
    import fsspec

    from zeroserve.runtime.storage import fetch

    def naive() -> None:
        fs = fsspec.filesystem(protocol, skip_instance_cache=True)
        with fs.open(naive_path, "rb") as src, open(out, "wb") as dst:
            dst.write(src.read())

    def run_fetch() -> object:
        return fetch(uri, cache, max_workers=args.workers, chunk_size=args.chunk_mib * MiB)

    rows = [("naive fs.open().read()", _timed(args.repeat, lambda: out.unlink(missing_ok=True), naive))]
    rows.append(("fetch() cold", _timed(args.repeat, lambda: shutil.rmtree(cache, ignore_errors=True), run_fetch)))
    result = run_fetch()
    rows.append(("fetch() warm (cache hit)", _timed(args.repeat, lambda: None, run_fetch)))
    assert result.cache_hit  # type: ignore[attr-defined]
    for copy in (out, result.path):  # type: ignore[attr-defined]
        assert _sha256(copy) == args.expected, f"{copy} differs from the source"
    return rows


def _print(title: str, rows: list[tuple[str, float]], size_mib: int) -> None:
    print(title)
    print(f"  {'case':<26}{'seconds':>9}{'MiB/s':>8}{'vs naive':>10}")
    for name, seconds in rows:
        print(f"  {name:<26}{seconds:>9.3f}{size_mib / seconds:>8.0f}{rows[0][1] / seconds:>9.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the median is shown")
    parser.add_argument("--chunk-mib", type=int, default=16)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # internal: run the control server
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _RangeHandler.root = args.serve
        http.server.ThreadingHTTPServer(("127.0.0.1", args.port), _RangeHandler).serve_forever()
        return 0

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
        AWS_EC2_METADATA_DISABLED="true",
    )
    work = Path(tempfile.mkdtemp(prefix="zeroserve-bench-"))
    site: subprocess.Popen[bytes] | None = None
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        _wait_listening(proc, port)
        import boto3

        source = work / "www" / "model.onnx"
        source.parent.mkdir()
        with open(source, "wb") as fh:
            for _ in range(args.size_mib):
                fh.write(os.urandom(MiB))
        args.expected = _sha256(source)
        client = boto3.client("s3")
        client.create_bucket(Bucket="bench")
        client.upload_file(str(source), "bench", "model.onnx")

        print(
            f"{args.size_mib} MiB object; chunk {args.chunk_mib} MiB, {args.workers} workers;"
            f" median of {args.repeat}; {os.cpu_count()} CPUs"
        )
        rows = _measure("s3://bench/model.onnx", "bench/model.onnx", "s3", work / "c1", work / "n1", args)
        _print(f"moto S3 server at {endpoint}", rows, args.size_mib)

        # The control server runs in its own process, so it does not share a GIL with the client.
        http_port = _free_port()
        site = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(source.parent), "--port", str(http_port)],
            stdin=subprocess.DEVNULL,
        )
        _wait_listening(site, http_port)
        url = f"http://127.0.0.1:{http_port}/model.onnx"
        rows = _measure(url, url, "http", work / "c2", work / "n2", args)
        _print("control: loopback http.server process with cheap ranges (os.pread)", rows, args.size_mib)
    finally:
        for server in (site, proc):
            if server is not None:
                _stop(server)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
