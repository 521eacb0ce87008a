"""Local, content-addressed cache of remote model files.

An entry lives at ``<cache_dir>/models/<key>/``: the mirrored files under ``model/`` and a
``manifest.json`` beside them (not inside, so a loader scanning the model folder sees only model files).
The key hashes the canonical URI and, for every file, its relative path, size and version marker (ETag,
generation, mtime), so a changed object lands in a new entry instead of being served stale.

The manifest is written last and atomically. An entry without one, or whose files disagree with it, is
incomplete: it is rebuilt, never served.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CacheEntry", "RemoteFile", "entry_key"]

_FORMAT = 1  # bump when the layout changes; old entries then no longer match and are rebuilt


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """One remote object to mirror."""

    path: str  # as the filesystem names it, for reads
    rel: str  # POSIX path inside the model folder
    size: int
    version: str  # ETag, generation or mtime; "" when the backend gives none


def entry_key(uri: str, files: Sequence[RemoteFile]) -> str:
    """The cache key of a listing: sha256 of the URI and each file's path, size and version."""
    doc = {"format": _FORMAT, "uri": uri, "files": _rows(files)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _rows(files: Sequence[RemoteFile]) -> list[list[Any]]:
    return [[f.rel, f.size, f.version] for f in sorted(files, key=lambda f: f.rel)]


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One cache entry: a folder holding ``model/`` and ``manifest.json``."""

    root: Path

    @classmethod
    def for_listing(cls, cache_dir: Path, uri: str, files: Sequence[RemoteFile]) -> CacheEntry:
        return cls(Path(cache_dir) / "models" / entry_key(uri, files))

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def is_complete(self, files: Sequence[RemoteFile]) -> bool:
        """True when the manifest matches ``files`` and every file on disk has its listed size."""
        try:
            doc = json.loads(self.manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        rows = _rows(files)
        if not isinstance(doc, dict) or doc.get("files") != rows:
            return False
        for rel, size, _version in rows:
            try:
                if (self.model_dir / rel).stat().st_size != size:
                    return False
            except OSError:
                return False
        return True

    def reset(self) -> Path:
        """Empty the entry for a rebuild and return its model folder.

        The manifest goes first: a crash half-way through leaves an entry that reads as incomplete.
        """
        self.manifest.unlink(missing_ok=True)
        if self.model_dir.exists():
            shutil.rmtree(self.model_dir)
        self.model_dir.mkdir(parents=True)
        return self.model_dir

    def commit(self, uri: str, files: Sequence[RemoteFile]) -> None:
        """Mark the entry complete: write the manifest to a temporary name, then rename it into place."""
        doc = {"format": _FORMAT, "uri": uri, "files": _rows(files)}
        tmp = self.root / f".manifest.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
        os.replace(tmp, self.manifest)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the entry exclusively.

        Processes sharing a cache (server workers, pods on one volume) then build an entry once: the
        second one waits, then finds it complete. The lock is released when the file is closed.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as handle:
            if sys.platform != "win32":
                import fcntl  # POSIX only; the server images are Linux

                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            yield
