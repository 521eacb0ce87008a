"""Content-addressed store of built session artifacts on any fsspec URI (``--cache_uri``).

An entry is ``<uri>/<key>/files/...`` plus ``<uri>/<key>/manifest.json``, the manifest holding the key's
fields and the size and sha256 of every file. The key is the sha256 of the fields (``artifact_keys.py``),
so an entry is found by what it is valid for, and a pod starting from zero anywhere finds the work of the
last one.

Remote entries are mirrored into ``<cache_dir>/artifacts/<key>/`` (a local ``--cache_uri`` *is* that
folder). Every read verifies each file against the manifest; an entry that fails (missing, truncated,
tampered, written for another key) is logged, emptied and rebuilt, never served. Writes are atomic: files
land under temporary names and are renamed; the manifest goes last, locally and remotely, so a reader
never sees a manifest whose files are not all there. Uploads run in a background thread: a failed upload
is logged and costs only the next pod a rebuild.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from zeroserve.runtime.artifact_keys import artifact_key
from zeroserve.runtime.digests import DigestMemo, sha256_file
from zeroserve.runtime.download_cache import CacheEntry
from zeroserve.runtime.server_errors import StorageError
from zeroserve.runtime.storage import _BACKENDS, _explained, _filesystem

logger = logging.getLogger(__name__)

__all__ = ["ArtifactStore", "Lookup"]

_MANIFEST, _FILES = "manifest.json", "files"


@dataclass(frozen=True, slots=True)
class Lookup:
    """The outcome of one lookup: where the artifact files are (or go), and where they came from."""

    key: str
    fields: Mapping[str, Any]
    files: Path  # a verified entry's files on a hit; an empty private build folder on a miss
    source: Literal["local", "remote", "miss"]

    @property
    def hit(self) -> bool:
        return self.source != "miss"


class ArtifactStore:
    """The artifact cache at ``uri``; constructing it does no I/O and imports no fsspec backend.

    Raises StorageError for a URI scheme no backend reads.
    """

    def __init__(self, uri: str, cache_dir: Path, *, storage_options: Mapping[str, Any] | None = None) -> None:
        self.uri = uri.rstrip("/")
        scheme, sep, _ = uri.partition("://")
        self._remote = bool(sep) and scheme.lower() != "file"
        if self._remote and scheme.lower() not in _BACKENDS:
            supported = ", ".join(f"{name}://" for name in _BACKENDS)
            raise StorageError(f"--cache_uri {uri!r}: unsupported scheme {scheme!r}; use a local folder or {supported}")
        # A local --cache_uri is where entries live; a remote one is mirrored under the model cache.
        self._local_base = Path(cache_dir) / "artifacts" if self._remote else _local_folder(uri)
        self._storage_options = dict(storage_options or {})
        self._fs: Any = None
        # Digests of local files, so that an unchanged entry (and model) is not hashed on every start.
        self.memo = DigestMemo(Path(cache_dir) / "artifacts" / ".digests")
        self._uploads: list[threading.Thread] = []

    def __repr__(self) -> str:
        return f"ArtifactStore(uri={self.uri!r})"

    def _local_root(self, key: str) -> Path:
        return self._local_base / key

    def lookup(self, fields: Mapping[str, Any]) -> Lookup:
        """Find the verified entry for ``fields``, locally first, then at the URI. Blocking.

        Never raises for a bad or unreachable entry: that is logged and reported as a miss.
        """
        key = artifact_key(fields)
        root = self._local_root(key)
        try:
            with CacheEntry(root).lock():
                if _verified(root, key, fields, self.memo):
                    return Lookup(key, fields, root / _FILES, "local")
                if self._remote and self._download(key, fields, root):
                    return Lookup(key, fields, root / _FILES, "remote")
        except (OSError, StorageError) as exc:
            logger.warning("artifact cache %s: lookup of %s failed, building instead: %s", self.uri, key[:12], exc)
        build = root / f".build-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        build.mkdir(parents=True, exist_ok=True)
        return Lookup(key, fields, build, "miss")

    def publish(self, lookup: Lookup, *, keep_build: bool = False) -> None:
        """Commit the files a miss built into ``lookup.files`` as the entry, then upload it in the background.

        ``keep_build`` leaves the build folder's files in place (the TensorRT EP may write more there).
        Failures are logged, never raised: the server runs fine without its cache.
        """
        if lookup.hit:
            return
        root = lookup.files.parent
        try:
            with CacheEntry(root).lock():
                manifest = _commit(root, lookup, keep_build)
        except OSError as exc:
            logger.warning("artifact cache %s: could not store %s: %s", self.uri, lookup.key[:12], exc)
            return
        if not keep_build:
            shutil.rmtree(lookup.files, ignore_errors=True)
        logger.info("artifact cache: stored %s %s", manifest["fields"]["kind"], lookup.key[:12])
        if self._remote:
            thread = threading.Thread(
                target=self._upload, args=(lookup.key, root), name="zeroserve-artifact-upload", daemon=True
            )
            self._uploads.append(thread)
            thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for background uploads; True when none is still running."""
        for thread in self._uploads:
            thread.join(timeout)
        return not any(thread.is_alive() for thread in self._uploads)

    def _filesystem(self) -> Any:
        if self._fs is None:
            backend = _BACKENDS[self.uri.partition("://")[0].lower()]
            with _explained(self.uri):
                self._fs = _filesystem(backend, self._storage_options)
        return self._fs

    def _download(self, key: str, fields: Mapping[str, Any], root: Path) -> bool:
        fs, remote = self._filesystem(), f"{self.uri}/{key}"
        with _explained(self.uri):
            try:
                raw = fs.cat_file(f"{remote}/{_MANIFEST}")
            except FileNotFoundError:
                return False
            doc = _manifest(raw, key, fields)
            if doc is None:
                logger.warning("artifact cache %s: manifest of %s does not fit its key; rebuilding", self.uri, key[:12])
                return False
            _reset(root)
            for rel, meta in doc["files"].items():
                dest = root / _FILES / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(f".{dest.name}.part")
                fs.get_file(f"{remote}/{_FILES}/{rel}", str(tmp))
                if sha256_file(tmp) != meta["sha256"]:
                    logger.warning("artifact cache %s: %s of %s is corrupt; rebuilding", self.uri, rel, key[:12])
                    _reset(root)
                    return False
                os.replace(tmp, dest)
        _write_atomic(root / _MANIFEST, raw)
        return True

    def _upload(self, key: str, root: Path) -> None:
        remote = f"{self.uri}/{key}"
        try:
            raw = (root / _MANIFEST).read_bytes()
            doc = json.loads(raw)
            fs = self._filesystem()
            with _explained(self.uri):
                for rel in doc["files"]:
                    fs.put_file(str(root / _FILES / rel), f"{remote}/{_FILES}/{rel}")
                fs.pipe_file(f"{remote}/{_MANIFEST}", raw)  # last: the entry exists once this lands
        except Exception as exc:  # a background thread: nothing above it would see the error
            logger.warning("artifact cache %s: upload of %s failed (next start rebuilds): %s", self.uri, key[:12], exc)
            return
        logger.info("artifact cache: uploaded %s to %s", key[:12], remote)


def _local_folder(uri: str) -> Path:
    if "://" not in uri:
        return Path(uri).expanduser()
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise StorageError(f"--cache_uri {uri!r} names a remote host; file:// URIs must be local")
    return Path(url2pathname(unquote(parts.path)))


def _manifest(raw: bytes, key: str, fields: Mapping[str, Any]) -> dict[str, Any] | None:
    """The parsed manifest when it belongs to ``key`` and lists only safe file names; else None."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("key") != key or doc.get("fields") != fields:
        return None
    files = doc.get("files")
    if not isinstance(files, dict) or not all(_safe(rel) and isinstance(m, dict) for rel, m in files.items()):
        return None
    return doc


def _safe(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def _verified(root: Path, key: str, fields: Mapping[str, Any], memo: DigestMemo) -> bool:
    """True when the local entry's manifest fits ``key`` and every file matches it; removes unlisted files
    (a TensorRT EP may have added engines for new shapes) so that nothing unverified is handed to ORT."""
    try:
        raw = (root / _MANIFEST).read_bytes()
    except OSError:
        return False
    doc = _manifest(raw, key, fields)
    files = root / _FILES
    bad = doc is None or any(
        not (files / rel).is_file()
        or (files / rel).stat().st_size != meta.get("size")
        or memo.sha256(files / rel) != meta.get("sha256")
        for rel, meta in doc["files"].items()
    )
    if bad:
        logger.warning("artifact cache: local entry %s is corrupt or stale; rebuilding", root)
        _reset(root)
        return False
    assert doc is not None
    for path in [p for p in files.rglob("*") if p.is_file()]:
        if path.relative_to(files).as_posix() not in doc["files"]:
            path.unlink()
    return True


def _reset(root: Path) -> None:
    """Empty an entry: the manifest first, so a crash half-way leaves an entry that reads as a miss."""
    (root / _MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(root / _FILES, ignore_errors=True)


def _commit(root: Path, lookup: Lookup, keep_build: bool) -> dict[str, Any]:
    built = sorted(p for p in lookup.files.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not built:
        raise OSError(f"nothing was built in {lookup.files}")
    _reset(root)
    staging = root / f".staging-{uuid.uuid4().hex[:8]}"
    files: dict[str, dict[str, Any]] = {}
    for path in built:
        rel = path.relative_to(lookup.files).as_posix()
        dest = staging / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if keep_build:
            shutil.copyfile(path, dest)
        else:
            os.replace(path, dest)
        files[rel] = {"size": dest.stat().st_size, "sha256": sha256_file(dest)}
    os.replace(staging, root / _FILES)
    doc = {"key": lookup.key, "fields": dict(lookup.fields), "files": files}
    _write_atomic(root / _MANIFEST, json.dumps(doc, indent=1, sort_keys=True).encode())
    return doc


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
