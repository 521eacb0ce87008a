"""memory.py: the collector paused through start-up in a real server process, glibc's thresholds fixed in a real
process that allocates what large requests do."""

from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zeroserve.runtime import memory

from conftest import start_server

# 16 buffers of 600 KB (an image request's tensor) in flight, all freed, 20 times over; the minor page faults
# of the last 10 rounds. glibc's adaptive trim threshold hands the freed buffers back to the kernel every round.
ALLOCATE_LIKE_REQUESTS = """
import resource, sys
sys.path[:0] = {path!r}
if {tune!r}:
    from zeroserve.runtime import memory
    assert memory.tune_malloc()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for round in range(20):
    if round == 10:
        before = faults()
    buffers = [b"x" * 600_000 for _ in range(16)]
    del buffers
print(faults() - before)
"""


def _faults(tune: bool) -> int:
    environ = {name: value for name, value in os.environ.items() if not name.startswith(("MALLOC_", "GLIBC_TUN"))}
    script = ALLOCATE_LIKE_REQUESTS.format(path=sys.path, tune=tune)
    done = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytest.mark.skipif(not memory._is_glibc(), reason="the thresholds are glibc's")
def test_fixed_thresholds_keep_large_buffers_for_the_next_requests() -> None:
    adaptive, fixed = _faults(tune=False), _faults(tune=True)
    # 10 rounds x 16 buffers x 147 pages: about 23,500 faults when every buffer comes back from the kernel.
    assert adaptive > 10_000
    assert fixed < adaptive / 20


@pytest.mark.parametrize(
    "environ",
    [{"MALLOC_TRIM_THRESHOLD_": "131072"}, {"MALLOC_MMAP_THRESHOLD_": "65536"},
     {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}],
)  # fmt: skip
def test_glibcs_own_variables_leave_the_choice_to_the_operator(environ: dict[str, str]) -> None:
    assert memory.tune_malloc(environ) is False


def test_resume_without_a_pause_leaves_the_collector_alone() -> None:
    frozen, enabled = gc.get_freeze_count(), gc.isenabled()
    memory.resume_gc()  # what a test process that builds the app itself goes through
    assert (gc.get_freeze_count(), gc.isenabled()) == (frozen, enabled)


def test_a_server_turns_the_collector_back_on_as_loading_begins(model_repository: Path, tmp_path: Path) -> None:
    server = start_server(["--model_dir", str(model_repository), "--log_level", "debug"], tmp_path / "server.log")
    try:  # ready is answered a moment before the loader logs that it is done
        deadline = time.monotonic() + 10
        while "all models ready" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = server.log()
    finally:
        server.stop()
    found = re.search(r"garbage collector on again; (\d+) objects from start-up frozen", log)
    assert found, log
    assert int(found.group(1)) > 20_000  # the server stack (about 68,000 objects), imported with the collector off
    assert log.index("garbage collector on again") < log.index("all models ready")


def test_an_entry_point_that_ends_before_loading_turns_the_collector_back_on() -> None:
    from zeroserve.runtime.__main__ import main

    assert gc.isenabled()
    with pytest.raises(SystemExit):
        main(["--help"])  # what `zeroserve serve --help` runs, in this process
    assert gc.isenabled()
    try:  # and the pause is not left half-done: a new one pauses and resumes again
        memory.pause_gc_for_startup()
        assert not gc.isenabled()
    finally:
        memory.resume_gc(freeze=False)
    assert gc.isenabled()
