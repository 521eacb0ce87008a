"""The activator's settings: one frozen value, built from the command line in ``dev.py`` only."""

from __future__ import annotations

from dataclasses import dataclass, field

from zeroserve.activator.backoff import BackoffPolicy

MiB = 2**20


@dataclass(frozen=True, slots=True)
class ScaleSettings:
    """How ``zeroserve dev`` scales; the Knative setting each one mirrors is named beside it."""

    idle_timeout: float = 30.0  # seconds without requests before a process is stopped (scale-to-zero grace)
    max_concurrency: int = 8  # in-flight requests per process (containerConcurrency)
    max_processes: int = 1  # max-scale
    queue_depth: int = 100  # requests held while no process has room (the activator's breaker queue)
    request_timeout: float = 300.0  # timeoutSeconds: cold start included
    start_timeout: float = 600.0  # progress-deadline: a process not ready by then is stopped, a failed start
    probe_hold: float = 10.0  # seconds a readiness probe is held during a start before "loading" is answered
    drain_timeout: float = 10.0  # seconds in-flight requests may take to finish on shutdown
    max_body_bytes: int = 256 * MiB  # the server's --max_request_mib, enforced before a process is involved
    stop_grace: float = 35.0  # SIGTERM to SIGKILL for a child: the server's --shutdown_timeout and a margin
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)

    def problems(self) -> list[str]:
        """What is wrong with these settings, as messages that name the flag."""
        found = [f"--{name} must be positive" for name in
                 ("idle_timeout", "max_concurrency", "max_processes", "request_timeout", "start_timeout")
                 if getattr(self, name) <= 0]
        found += [f"--{name} must be zero or more" for name in ("queue_depth", "probe_hold", "drain_timeout")
                  if getattr(self, name) < 0]
        if self.backoff.initial <= 0 or self.backoff.max < self.backoff.initial:
            found.append("--backoff_initial must be positive and at most --backoff_max")
        if self.backoff.reset < 0:
            found.append("--backoff_reset must be zero or more")
        if self.backoff.starts_per_minute < 1:
            found.append("--max_starts_per_minute must be at least 1")
        return found
