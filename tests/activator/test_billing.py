"""``zeroserve dev`` prints what its server processes cost when it stops: every invocation billed, each process's
whole life, and one instance always on, read from each process's counters before it is stopped."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from tests.activator.conftest import ActivatorProcess, infer, wait_until

Start = Callable[..., ActivatorProcess]


def figure(log: str, name: str) -> float:
    match = re.search(rf"^\s+{name}\s+([\d.]+)", log, re.MULTILINE)
    assert match is not None, log
    return float(match.group(1))


def test_the_summary_bills_each_invocation_and_each_process(activator: Start, model_dir: Path) -> None:
    dev = activator("--model_name", "mlp", "--model_dir", str(model_dir), "--idle_timeout", "1",
                    "--billing_memory_mib", "2048")
    for _ in range(3):
        assert infer(dev.url).status_code == 200
    wait_until(lambda: "scaled to zero" in dev.log(), 30, "the first process stopped for idleness")
    for _ in range(2):  # a second process, started cold
        assert infer(dev.url).status_code == 200
    assert dev.stop() == 0
    log = dev.log()
    assert "billing over" in log and "2 server process(es) counted, billed at 2.00 GB" in log
    assert figure(log, "invocations") == 5
    billed, instances, always_on = (figure(log, name) for name in ("billed", "instances", "always on"))
    # Each invocation costs a few ms at 2 GB; the processes lived longer than their invocations took, and an
    # always-on instance longer than both.
    assert 0 < billed < instances < always_on
    assert "not counted" not in log
