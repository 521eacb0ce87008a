"""sha256 of local files, remembered across starts by each file's stat fingerprint.

Hashing a 50 MB model and its 50 MB optimized graph costs ~100 ms here, as much as the session the cache
saves. A file's fingerprint (device, inode, size, mtime and ctime in ns) changes with any write to it, and
ctime cannot be set back from user space, so a remembered digest whose fingerprint still matches is the
digest of the bytes on disk. As in git's "racy clean" rule, a fingerprint taken within two seconds of the
file's last change is not remembered (timestamps are coarse: a write in the same tick would not show), so
such a file is hashed in full again next time.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["DigestMemo", "sha256_file"]

_RACY_NS = 2 * 10**9


def sha256_file(path: Path, chunk: int = 4 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fingerprint(paths: Sequence[Path]) -> list[list[int]] | None:
    rows, now = [], time.time_ns()
    for path in paths:
        st = path.stat()
        if now - max(st.st_mtime_ns, st.st_ctime_ns) < _RACY_NS:
            return None
        rows.append([st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return rows


class DigestMemo:
    """Digests remembered in ``folder``, one small JSON file per hashed path (or group of paths)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def sha256(self, path: Path) -> str:
        """sha256 of one file's bytes."""
        return self.combined([path], lambda: sha256_file(path), "sha256")

    def combined(self, paths: Sequence[Path], compute: Callable[[], str], kind: str) -> str:
        """The digest ``compute()`` returns for ``paths``, remembered under ``kind`` while none changes."""
        name = hashlib.sha256(f"{kind}\0".encode() + "\0".join(str(p.resolve()) for p in paths).encode())
        memo = self.folder / f"{name.hexdigest()[:32]}.json"
        before = _fingerprint(paths)
        try:
            doc = json.loads(memo.read_text(encoding="utf-8"))
            if before is not None and doc["stat"] == before and isinstance(doc["digest"], str):
                return str(doc["digest"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        digest = compute()
        # Not remembered when racy, or when a file changed while it was hashed.
        if before is not None and _fingerprint(paths) == before:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                tmp = memo.with_name(f".{memo.name}.{uuid.uuid4().hex[:8]}.tmp")
                tmp.write_text(json.dumps({"stat": before, "digest": digest}), encoding="utf-8")
                os.replace(tmp, memo)
            except OSError:
                pass  # only a speed-up
        return digest
