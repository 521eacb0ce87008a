"""How the server process uses memory: the garbage collector during start-up, and glibc's malloc thresholds.

**Start-up.** Importing the server stack (numpy, grpc, protobuf, starlette, ONNX Runtime) creates hundreds of
thousands of objects, and the collector scans them again and again while they are new: on the 2-core machine,
six to eight young-generation passes of about 1.2 ms each, and with gRPC a full pass of 23 ms, all before the
first answer. ``pause_gc_for_startup`` turns the collector off at the entry point; ``resume_gc`` turns it back
on when loading begins, after moving everything that exists by then to the permanent generation (``gc.freeze``),
so later full passes skip the imported modules. Measured, process start to the first answer, 10 launches
each: small MLP over REST 576 -> 556 ms; image CNN with gRPC on 743 -> 685 ms.

**Large requests.** glibc serves an allocation above its mmap threshold with a new mapping, which the kernel
zero-fills page by page on first touch, and hands free memory at the top of a heap back to the kernel once it
exceeds the trim threshold. Both thresholds adapt to the allocations seen, and with requests of hundreds of
KiB in flight (grpc's read buffers, the message's bytes, a REST body) a process settles one way or the other by
chance: at 16 gRPC calls of 600 KB in flight, a server took either 60 or 260 page faults per call, 1.2 or 1.9 ms
of CPU per call, from one launch to the next; with fixed thresholds, under 6. The price is memory kept for
reuse after a burst, bounded by the trim threshold per malloc arena; the idle RSS before the first request does
not change. Setting any of glibc's own malloc variables (``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TOP_PAD_``, or ``malloc`` in ``GLIBC_TUNABLES``) leaves the choice to them.
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
# Free memory kept at the top of a heap for the next requests before it goes back to the kernel.
TRIM_THRESHOLD_BYTES: Final = 32 * 1024 * 1024

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
        logger.debug("garbage collector on again; %d objects from start-up frozen", gc.get_freeze_count())


def tune_malloc(environ: Mapping[str, str] = os.environ) -> bool:
    """Fix glibc's thresholds for this process, unless the environment already chooses; returns whether set."""
    if any(name in environ for name in _GLIBC_VARIABLES) or "malloc" in environ.get("GLIBC_TUNABLES", ""):
        return False
    if not _is_glibc():
        return False  # musl (Alpine), macOS: other allocators, other knobs
    import ctypes

    libc = ctypes.CDLL(None)
    done = int(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) == 1
    done = int(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)) == 1 and done
    if not done:
        logger.debug("glibc's mallopt refused the malloc thresholds; keeping its adaptive ones")
    return done


def _is_glibc() -> bool:
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows), or the name is unknown (musl, macOS)
        return False
    return bool(version and version.startswith("glibc"))
