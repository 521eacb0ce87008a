"""What the server processes cost, billed per invocation as a serverless platform bills them, beside what they and
an always-on instance would have cost: each process's metering counters (the server's metering.py) are read from
its ``/metrics`` just before it is stopped, and the sums are printed when ``zeroserve dev`` stops.

A process that dies on its own takes its counters with it; the summary says how many were lost that way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import httpx

logger = logging.getLogger("zeroserve.dev")

GB = 2**30  # as the server bills: Lambda's GB is 1024 MB
_FAMILIES = {
    "zeroserve_invocations_total": "invocations",
    "zeroserve_billed_gb_seconds_total": "billed_gb_seconds",
    "zeroserve_instance_gb_seconds_total": "instance_gb_seconds",
    "zeroserve_invocation_cpu_seconds_total": "cpu_seconds",
}


@dataclass
class Billing:
    started: float = field(default_factory=time.monotonic)
    invocations: float = 0.0
    billed_gb_seconds: float = 0.0
    instance_gb_seconds: float = 0.0
    cpu_seconds: float = 0.0
    memory_bytes: int = 0  # the memory the processes bill for, as the last one read said
    processes: int = 0
    unread: int = 0  # processes whose counters could not be read (they died, or did not answer)

    async def collect(self, client: httpx.AsyncClient, url: str) -> None:
        """Add the counters of the process at ``url`` (its base URL), about to be stopped."""
        try:
            response = await client.get(f"{url}/metrics", timeout=2.0)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            self.unread += 1
            logger.debug("billing: could not read %s/metrics: %s", url, exc)
            return
        sums = parse(response.text)
        self.processes += 1
        for family, name in _FAMILIES.items():
            setattr(self, name, getattr(self, name) + sums.get(family, 0.0))
        self.memory_bytes = int(sums.get("zeroserve_billing_memory_bytes", self.memory_bytes))

    def lost(self) -> None:
        """A process stopped without its counters read (it died on its own)."""
        self.unread += 1

    def summary(self, now: float | None = None) -> str:
        elapsed = (time.monotonic() if now is None else now) - self.started
        memory = f"{self.memory_bytes / GB:.2f} GB" if self.memory_bytes else "the memory limit"
        always_on = elapsed * self.memory_bytes / GB
        lines = [
            f"billing over {elapsed:.0f} s, {self.processes} server process(es) counted, billed at {memory}:",
            f"  invocations          {self.invocations:.0f}",
            f"  billed               {self.billed_gb_seconds:.3f} GB-s   (each invocation, rounded up to 1 ms)",
            f"  instances            {self.instance_gb_seconds:.3f} GB-s   (the processes' whole lives)",
            f"  always on            {always_on:.3f} GB-s   (one instance for the whole {elapsed:.0f} s)"
            if self.memory_bytes else "  always on            unknown (no process was read)",
            f"  invocation CPU       {self.cpu_seconds:.3f} s",
        ]
        if self.unread:
            lines.append(f"  not counted          {self.unread} process(es) whose counters could not be read "
                         "(they died, or were killed)")
        return "\n".join(lines)


def parse(text: str) -> dict[str, float]:
    """The sum over labels of each sample in a Prometheus text exposition."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_and_labels, _, value = line.rpartition(" ")
        name = name_and_labels.split("{", 1)[0]
        try:
            sums[name] = sums.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return sums
