"""What the container may use: its CPU quota and its memory limit, from cgroup v2 or v1.

The host's core count and memory say nothing about a container's share: ONNX Runtime's threads follow the
CPU quota, and the memory limit bounds what requests may hold and what an invocation is billed for.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path


def cpu_quota(
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    *,
    host_cpus: int | None = None,
    proc_cgroup: Path = Path("/proc/self/cgroup"),
) -> int:
    """The CPUs this process may use: its cgroup CPU quota (v2 or v1, rounded up), capped by the CPUs it
    may run on (``host_cpus``, by default its affinity mask), and never below 1."""
    if host_cpus is None:
        try:
            host_cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            host_cpus = os.cpu_count() or 1
    limit = _cgroup_limit(cgroup_root, proc_cgroup)
    return max(1, host_cpus if limit is None else min(host_cpus, math.ceil(limit)))


def memory_limit(
    cgroup_root: Path = Path("/sys/fs/cgroup"), *, proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int | None:
    """The memory this process may use, in bytes: its cgroup's ``memory.max`` (v2) or ``memory.limit_in_bytes``
    (v1), the smallest along its ancestors; None when no limit is set."""
    v2 = (cgroup_root / "cgroup.controllers").exists()
    base = cgroup_root if v2 else (cgroup_root / "memory" if (cgroup_root / "memory").is_dir() else None)
    if base is None:
        return None
    limits = [
        limit for d in _own_dirs(base, proc_cgroup, v2, "memory") if (limit := _read_memory(d, v2)) is not None
    ]
    return min(limits, default=None)


def physical_memory() -> int:
    """The machine's memory, in bytes (what a process without a cgroup limit may use at most)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _read_memory(folder: Path, v2: bool) -> int | None:
    try:
        text = (folder / ("memory.max" if v2 else "memory.limit_in_bytes")).read_text().strip()
    except OSError:
        return None
    if text == "max" or not text.isdigit():
        return None
    value = int(text)
    # v1 says "no limit" with a number near 2**63 rounded down to a page.
    return value if value < 2**62 else None


def _cgroup_limit(root: Path, proc_cgroup: Path) -> float | None:
    v2 = (root / "cgroup.controllers").exists()
    if v2:
        base: Path | None = root
    else:  # v1 mounts the controller as cpu or cpu,cpuacct (often one a link to the other)
        base = next((root / d for d in ("cpu", "cpu,cpuacct") if (root / d).is_dir()), None)
    if base is None:
        return None
    limits = [q for d in _own_dirs(base, proc_cgroup, v2, "cpu") if (q := _read_limit(d, v2)) is not None]
    return min(limits, default=None)


def _own_dirs(base: Path, proc_cgroup: Path, v2: bool, controller: str) -> Iterator[Path]:
    # The process's own cgroup and its ancestors: a limit on any of them applies. Inside a cgroup
    # namespace (or a v1 container) the mount root already is the own cgroup and the path does not exist.
    rel = ""
    try:
        for line in proc_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if (v2 and controllers == "") or (not v2 and controller in controllers.split(",")):
                rel = path.strip("/")
    except (OSError, ValueError):
        pass
    here = base / rel
    if not rel or ".." in Path(rel).parts or not here.is_dir():
        here = base
    yield here
    while here != base:
        here = here.parent
        yield here


def _read_limit(folder: Path, v2: bool) -> float | None:
    try:
        if v2:  # cpu.max: "max 100000" or "150000 100000"
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1_quota = int((folder / "cpu.cfs_quota_us").read_text())  # -1 means no limit
        return v1_quota / int((folder / "cpu.cfs_period_us").read_text()) if v1_quota > 0 else None
    except (OSError, ValueError, ZeroDivisionError):
        return None
