"""Model URI -> local path, through fsspec, with a local content-addressed cache.

Local paths and ``file://`` URIs are used where they are. Remote URIs (``s3://``, ``gs://``, ``az://``,
``http(s)://``) are listed, keyed by that listing (see ``cache.py``) and mirrored into the cache, so a
second fetch of an unchanged URI reads metadata only.

Large objects are read as parallel byte ranges and written in place with ``os.pwrite``: a plain
sequential fsspec read is several times slower than the vendor CLIs, which split downloads the same way.
fsspec and each backend are imported only when a URI of that kind is fetched, to keep cold start short; s3://
goes through botocore alone (``s3_direct.py``) unless storage options ask for s3fs's own.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import posixpath
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from zeroserve.runtime.coldstart import ByteProgress
from zeroserve.runtime.download_cache import CacheEntry, RemoteFile
from zeroserve.runtime.server_errors import StorageError

__all__ = ["FetchResult", "fetch"]

# fsspec.AbstractFileSystem; fsspec ships no type information, so naming the class would check nothing.
_FileSystem = Any


@dataclass(frozen=True, slots=True)
class _Backend:
    protocol: str  # the fsspec protocol name
    module: str  # the package that must be importable
    extra: str  # the zeroserve extra that installs it


_BACKENDS: dict[str, _Backend] = {
    "s3": _Backend("s3", "s3fs", "s3"),
    "s3a": _Backend("s3", "s3fs", "s3"),
    "gs": _Backend("gs", "gcsfs", "gcs"),
    "gcs": _Backend("gs", "gcsfs", "gcs"),
    "az": _Backend("az", "adlfs", "azure"),
    "abfs": _Backend("abfs", "adlfs", "azure"),
    "abfss": _Backend("abfs", "adlfs", "azure"),  # fsspec registers no "abfss"; adlfs parses the URI
    "http": _Backend("http", "aiohttp", "http"),
    "https": _Backend("https", "aiohttp", "http"),
}
_HTTP = frozenset({"http", "https"})

# Strongest first: a content hash or generation beats a timestamp. The first one present is used.
_VERSION_FIELDS = (
    "ETag", "etag", "generation", "md5Hash", "Content-MD5", "Digest", "version_id",
    "LastModified", "last_modified", "Last-Modified", "updated", "mtime",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class FetchResult:
    """Where a model landed and what it cost."""

    path: Path  # local file or folder holding the model
    cache_hit: bool  # True when no remote bytes were read (or the URI was local)
    bytes_fetched: int  # remote bytes read in this call
    seconds: float


def fetch(
    uri: str,
    cache_dir: Path,
    *,
    storage_options: Mapping[str, Any] | None = None,
    max_workers: int = 8,
    chunk_size: int = 16 * 2**20,
    progress: ByteProgress | None = None,
) -> FetchResult:
    """Make the model at ``uri`` available locally. Blocking: run it in a worker thread.

    Args:
        uri: a local path, ``file://``, ``s3://``, ``gs://``, ``az://``/``abfs(s)://`` or ``http(s)://``
            URI naming one file or (except over http) a folder.
        cache_dir: where remote models are mirrored, under ``models/``.
        storage_options: passed to the fsspec filesystem (credentials, ``endpoint_url``, ...).
        max_workers: concurrent range reads.
        chunk_size: bytes per range read; files up to this size are read in one request.
        progress: told the bytes to read, then each range read as it lands (from the reading threads).

    Raises:
        StorageError: the URI does not exist, cannot be read, or its backend is not installed.
    """
    if max_workers < 1 or chunk_size < 1:
        raise ValueError("max_workers and chunk_size must be positive")
    started = time.perf_counter()
    scheme, sep, _ = uri.partition("://")
    if not sep or scheme.lower() == "file":
        return FetchResult(_local_path(uri), True, 0, time.perf_counter() - started)
    backend = _BACKENDS.get(scheme.lower())
    if backend is None:
        supported = ", ".join(f"{name}://" for name in _BACKENDS)
        raise StorageError(
            f"model URI {uri!r} has an unsupported scheme {scheme!r}; use a local path, file://, {supported}"
        )

    with _explained(uri):
        fs = _model_filesystem(backend, storage_options or {})
        files, single = _list(fs, uri, backend)
        canonical = fs.unstrip_protocol(fs._strip_protocol(uri))
    entry = CacheEntry.for_listing(cache_dir, canonical, files)
    target = entry.model_dir / files[0].rel if single else entry.model_dir
    # Without a version marker an unchanged listing proves nothing, so such a URI is always downloaded.
    cacheable = all(f.version for f in files)
    with _cache_io(entry.root), entry.lock():
        if cacheable and entry.is_complete(files):
            return FetchResult(target, True, 0, time.perf_counter() - started)
        model_dir = entry.reset()
        progress = progress or ByteProgress()
        progress.expect(sum(f.size for f in files))
        fetched = _download(
            fs, uri, files, model_dir, max_workers, chunk_size, progress, trust_ranges=backend.protocol not in _HTTP
        )
        entry.commit(canonical, files)
    return FetchResult(target, False, fetched, time.perf_counter() - started)


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names an object store or web server rather than a local path or file:// URI."""
    scheme, sep, _ = uri.partition("://")
    return bool(sep) and scheme.lower() != "file"


def list_files(uri: str, *, storage_options: Mapping[str, Any] | None = None) -> list[tuple[str, int]]:
    """Every file under the remote folder ``uri``: (path relative to it, size), in one recursive listing and
    without reading any. Blocking: run it in a worker thread. Raises StorageError as ``fetch`` does."""
    scheme = uri.partition("://")[0].lower()
    backend = _BACKENDS.get(scheme)
    if backend is None or backend.protocol in _HTTP:
        raise StorageError(f"model repository URI {uri!r} cannot be listed; use a local path, s3://, gs:// or az://")
    with _explained(uri):
        fs = _model_filesystem(backend, storage_options or {})
        files, single = _list(fs, uri.rstrip("/") + "/", backend)
    if single:
        raise StorageError(f"model repository URI {uri!r} names a file; on-demand loading needs a folder")
    return [(f.rel, f.size) for f in files]


def _local_path(uri: str) -> Path:
    if "://" in uri:
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"model URI {uri!r} names a remote host; file:// URIs must be local")
        path = Path(url2pathname(unquote(parts.path)))
    else:
        path = Path(uri).expanduser()
    if not path.exists():
        raise StorageError(f"model URI {uri!r} does not exist")
    return path


def _model_filesystem(backend: _Backend, options: Mapping[str, Any]) -> _FileSystem:
    """What ``fetch`` reads a model through: s3:// by botocore alone where it can (half s3fs's start-up cost,
    see ``s3_direct.py``), everything else by fsspec."""
    if backend.protocol == "s3" and not options and importlib.util.find_spec("botocore") is not None:
        from zeroserve.runtime.s3_direct import DirectS3

        return DirectS3()
    return _filesystem(backend, options)


def _filesystem(backend: _Backend, options: Mapping[str, Any]) -> _FileSystem:
    for module, extra in ((backend.module, backend.extra), ("fsspec", "runtime")):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # the package is there but broken inside: show its real error
                raise
            raise StorageError(
                f"reading {backend.protocol}:// URIs needs the '{module}' package: pip install 'zeroserve[{extra}]'"
            ) from exc
    # A fresh instance: fsspec's instance cache would pin the endpoint and credentials of the first call.
    return importlib.import_module("fsspec").filesystem(backend.protocol, **{"skip_instance_cache": True, **options})


def _list(fs: _FileSystem, uri: str, backend: _Backend) -> tuple[list[RemoteFile], bool]:
    """The files under ``uri`` and whether it named a single file (rather than a folder)."""
    root = fs._strip_protocol(uri)
    if backend.protocol in _HTTP:
        # No listing over http: fsspec would scrape links from a GET of the body, reading the model itself.
        if urlsplit(uri).path.endswith("/"):
            raise StorageError(f"model URI {uri!r} ends with '/'; an http(s) URI must name a single file")
        found = {root: fs.info(root)}
    else:
        # One recursive listing answers both "which files" and "file or folder" (fsspec falls back to
        # info() when nothing lies below the path); an info() first would cost one more round trip.
        # Where a backend's find() leaves a plain file out, info() has the last word (and raises if absent).
        found = fs.find(root, detail=True, withdirs=False) or {root: fs.info(root)}
    if list(found) == [root]:
        info = found[root] if found[root].get("size") is not None else fs.info(root)
        if info.get("type") == "directory":
            raise FileNotFoundError(root)
        if info.get("size") is None:
            raise StorageError(f"model URI {uri!r}: the server does not report the file's size")
        name = posixpath.basename(urlsplit(root).path if backend.protocol in _HTTP else root)
        return [RemoteFile(root, _safe_rel(uri, name or "model"), int(info["size"]), _version(info))], True
    prefix = root.rstrip("/") + "/"
    files = [
        RemoteFile(name, _safe_rel(uri, name[len(prefix) :]), int(detail["size"]), _version(detail))
        for name, detail in sorted(found.items())
        # Zero-byte "folder marker" keys that some tools create are not files to mirror.
        if detail.get("type") == "file" and not name.endswith("/") and name.startswith(prefix)
    ]
    if not files:
        raise FileNotFoundError(root)
    return files, False


def _safe_rel(uri: str, rel: str) -> str:
    # Object keys may hold "..", "//" or a leading "/"; mirrored naively they would escape the cache.
    if not rel or rel.startswith("/") or str(PurePosixPath(rel)) != rel or ".." in PurePosixPath(rel).parts:
        raise StorageError(f"model URI {uri!r} holds an object named {rel!r}, which is not a safe file name")
    return rel


def _version(info: Mapping[str, Any]) -> str:
    return next((str(info[field]) for field in _VERSION_FIELDS if info.get(field)), "")


def _download(
    fs: _FileSystem,
    uri: str,
    files: Sequence[RemoteFile],
    model_dir: Path,
    max_workers: int,
    chunk_size: int,
    progress: ByteProgress,
    *,
    trust_ranges: bool,
) -> int:
    """Read every file into ``model_dir`` with parallel range reads; return the bytes read."""
    fetched = 0
    parts: dict[Path, Path] = {}  # temporary file -> final place
    ranges: list[tuple[RemoteFile, Path, int, int]] = []
    for f in files:
        dest = model_dir / f.rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")  # the entry is locked: one writer, a fixed name is enough
        # ftruncate makes a sparse file of the final size, so ranges can land in any order. Not
        # posix_fallocate: where the filesystem lacks it, glibc falls back to writing every byte twice.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, f.size)
        finally:
            os.close(fd)
        parts[tmp] = dest
        start = 0
        if not trust_ranges and f.size > chunk_size:
            # Plain http servers may ignore Range and send the whole body. Ask once, serially, so that
            # such a server sends the file once rather than once per range.
            got = _read_range(fs, uri, f, tmp, 0, chunk_size, progress)
            fetched += got
            start = f.size if got == f.size else chunk_size
        ranges += [(f, tmp, s, min(s + chunk_size, f.size)) for s in range(start, f.size, chunk_size)]

    pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="zeroserve-fetch")
    try:
        futures: list[Future[int]] = [pool.submit(_read_range, fs, uri, *r, progress) for r in ranges]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in done:
            future.result()  # raises the first failure; the rest are cancelled below
        fetched += sum(future.result() for future in futures)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for tmp, dest in parts.items():
        os.replace(tmp, dest)
    return fetched


def _read_range(
    fs: _FileSystem, uri: str, f: RemoteFile, tmp: Path, start: int, end: int, progress: ByteProgress
) -> int:
    with _explained(uri):
        data = fs.cat_file(f.path, start=start, end=end)
    # A server that ignores Range answers the first range with the whole file, which is as good.
    if len(data) != end - start and not (start == 0 and len(data) == f.size):
        raise StorageError(
            f"model URI {uri!r}: expected {end - start} bytes at offset {start} of {f.rel!r}, got {len(data)};"
            " the object may have changed during the download"
        )
    view = memoryview(data)
    fd = os.open(tmp, os.O_WRONLY)
    try:
        while view:
            written = os.pwrite(fd, view, start)
            view, start = view[written:], start + written
    finally:
        os.close(fd)
    progress.add(len(data))
    return len(data)


@contextmanager
def _explained(uri: str) -> Iterator[None]:
    """Turn a backend failure into a StorageError a person can act on; the chain keeps the details."""
    try:
        yield
    except (StorageError, ImportError):
        raise
    except Exception as exc:
        raise StorageError(_describe(uri, exc)) from exc


@contextmanager
def _cache_io(root: Path) -> Iterator[None]:
    # Remote failures are StorageErrors by now, so an OSError here is the local disk's.
    try:
        yield
    except OSError as exc:
        raise StorageError(f"cannot write the model cache at {str(root)!r}: {exc}") from exc


def _describe(uri: str, exc: Exception) -> str:
    chain: list[BaseException] = [exc]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 10:
        chain.append(cause)
    for err in chain:
        name = type(err).__name__
        if isinstance(err, (ConnectionError, TimeoutError)) or "Connect" in name or "Timeout" in name:
            return f"cannot read model URI {uri!r}: network failure ({err})"
    if isinstance(exc, PermissionError) or any(getattr(err, "status", None) in (401, 403) for err in chain):
        return f"access denied to model URI {uri!r} ({exc}); check the credentials and their permissions"
    if isinstance(exc, FileNotFoundError):
        detail = str(exc).strip("'\"")
        hint = f" ({detail})" if detail and detail not in uri else ""
        return f"model URI {uri!r} does not exist{hint}: no object, and no folder with objects, at that path"
    return f"cannot read model URI {uri!r}: {type(exc).__name__}: {exc}"
