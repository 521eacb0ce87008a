"""How the server process uses memory: the garbage collector during start-up, and glibc's malloc thresholds.

**Start-up.** Importing the server stack (numpy, starlette, uvicorn, and grpc and protobuf when gRPC is on)
creates some 70,000 objects, and the collector scans them again and again while they are new, several passes
before the first answer. ``pause_gc_for_startup`` turns the collector off at the entry point; ``resume_gc`` turns
it back on when loading begins, after moving everything that exists by then to the permanent generation
(``gc.freeze``), so later full passes skip the imported modules. Any garbage cycles made while it was off stay.
bench/README.md ("Where a request runs") has the numbers.

**Large requests.** glibc serves an allocation above its mmap threshold with a new mapping, which the kernel
zero-fills page by page on first touch, and hands free memory at the top of a heap back to the kernel once it
exceeds the trim threshold. Both thresholds adapt to the allocations seen, and with requests of hundreds of
KiB in flight (grpc's read buffers, the message's bytes, a REST body) a process settles one way or the other by
chance, and the slow way costs several times the page faults and CPU per call; fixed thresholds take that chance
away. The price: freed memory stays in the process for reuse (only free space at the top of a heap above the
trim threshold goes back), in each of glibc's malloc arenas (up to 8 per core; ``MALLOC_ARENA_MAX`` caps them);
the idle RSS before the first request does not change. Setting any of glibc's own malloc variables
(``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TOP_PAD_``, or ``malloc`` in ``GLIBC_TUNABLES``)
leaves the choice to them.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Mapping
from typing import Final

logger = logging.getLogger("zeroserve.runtime")

# Allocations up to this size come from the heap (glibc's own ceiling for the adaptive threshold: 32 MiB).
MMAP_THRESHOLD_BYTES: Final = 32 * 1024 * 1024
# Free memory kept at the top of a heap for the next requests before it goes back to the kernel: the smallest
# that keeps the page faults away, so RSS after a burst stays near glibc's own (bench/README.md).
TRIM_THRESHOLD_BYTES: Final = 16 * 1024 * 1024

_M_TRIM_THRESHOLD: Final = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD: Final = -3
_GLIBC_VARIABLES: Final = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")

_paused_for_startup = False


def pause_gc_for_startup() -> None:
    """Turn the collector off until ``resume_gc``; for an entry point, before its heavy imports."""
    global _paused_for_startup
    if gc.isenabled():
        gc.disable()
        _paused_for_startup = True


def resume_gc(freeze: bool = True) -> None:
    """Undo ``pause_gc_for_startup``, freezing what start-up created unless told not to; nothing if it was not
    paused (a test process that builds the app itself keeps its collector as it was)."""
    global _paused_for_startup
    if _paused_for_startup:
        _paused_for_startup = False
        if freeze:
            gc.freeze()
        gc.enable()
        if logger.isEnabledFor(logging.DEBUG):  # counting walks the frozen objects
            logger.debug("garbage collector on again; %d objects from start-up frozen", gc.get_freeze_count())


def tune_malloc(environ: Mapping[str, str] = os.environ) -> bool:
    """Fix glibc's thresholds for this process, unless the environment already chooses; returns whether set."""
    if any(name in environ for name in _GLIBC_VARIABLES) or "malloc" in environ.get("GLIBC_TUNABLES", ""):
        return False
    if not _is_glibc():
        return False  # musl (Alpine), macOS: other allocators, other knobs
    import ctypes

    libc = ctypes.CDLL(None)
    # Either call ends the adaptation of both: the trim threshold is set only once the mmap one is, or buffers
    # over glibc's initial 128 KiB would all be mapped afresh (a 32-bit glibc refuses over 16 MiB).
    if int(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) != 1:
        logger.debug("glibc's mallopt refused the mmap threshold; keeping its adaptive thresholds")
        return False
    return int(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)) == 1


def _is_glibc() -> bool:
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows), or the name is unknown (musl, macOS)
        return False
    return bool(version and version.startswith("glibc"))


def release_free_memory() -> None:
    """Hand the heap's free memory back to the kernel (glibc's ``malloc_trim``): after large requests, whose
    buffers leave free space scattered through the heap that the trim threshold alone never returns. Blocking
    (it walks the heap): call it from a thread, when no large request is in flight."""
    if not _is_glibc():
        return
    import ctypes

    ctypes.CDLL(None).malloc_trim(0)


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
