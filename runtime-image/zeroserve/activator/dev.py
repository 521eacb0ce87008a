"""The command line of ``zeroserve dev`` (and ``python -m zeroserve.activator``).

Arguments it does not know go to every server process (``--model_dir``, ``--model_name``, ``--providers``...);
it reads two of them itself: ``--max_request_mib`` (enforced before a process is involved) and
``--shutdown_timeout`` (how long a process may take to stop before SIGKILL).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from zeroserve.activator.backoff import BackoffPolicy
from zeroserve.activator.settings import MiB, ScaleSettings

logger = logging.getLogger("zeroserve.activator")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zeroserve dev", allow_abbrev=False,
        description="Serve a model with scale to zero on this machine (Knative's activator and autoscaler in "
        "miniature): a server process starts on the first request, requests are held while it starts, and it "
        "stops when idle. A start that fails is answered at once with its reason, and the next one waits as "
        "kubelet's CrashLoopBackOff does. Other arguments (--model_dir, --model_name, ...) go to the server.",
    )
    defaults = ScaleSettings()
    backoff = defaults.backoff
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    add("--port", type=int, help="port to hold (env PORT; default 8080)")
    add("--idle_timeout", type=float, default=defaults.idle_timeout,
        help="seconds without requests before a server process stops (default %(default)g)")
    add("--max_concurrency", type=int, default=defaults.max_concurrency,
        help="in-flight requests per server process (default %(default)d)")
    add("--max_processes", type=int, default=defaults.max_processes,
        help="server processes at most (default %(default)d)")
    add("--queue_depth", type=int, default=defaults.queue_depth,
        help="requests held while no process has room; more get 503 (default %(default)d)")
    add("--request_timeout", type=float, default=defaults.request_timeout,
        help="seconds a request may take, cold start included; then 504 (default %(default)g)")
    add("--start_timeout", type=float, default=defaults.start_timeout,
        help="seconds a server process may take to become ready; then it is stopped, a failed start "
        "(default %(default)g)")
    add("--probe_hold", type=float, default=defaults.probe_hold,
        help="seconds a readiness probe is held while a process starts before it is answered 503 with the "
        "start's progress; 0 answers at once (default %(default)g). Any request may send 'Prefer: wait=N'")
    add("--backoff_initial", type=float, default=backoff.initial,
        help="seconds between a failed start and the next; doubles with every failure in a row "
        "(default %(default)g)")
    add("--backoff_max", type=float, default=backoff.max, help="the longest backoff (default %(default)g)")
    add("--backoff_reset", type=float, default=backoff.reset,
        help="seconds a process must stay ready to end a streak of failures (default %(default)g)")
    add("--max_starts_per_minute", type=int, default=backoff.starts_per_minute,
        help="while starts keep failing, server processes started in any 60 s at most (default %(default)d)")
    add("--drain_timeout", type=float, default=defaults.drain_timeout,
        help="seconds forwarded requests may take to finish on shutdown (default %(default)g)")
    return parser


def _server_limits(server_args: Sequence[str]) -> tuple[int, float]:
    """The server's ``--max_request_mib`` and ``--shutdown_timeout`` among the arguments passed on to it."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--max_request_mib", type=int, default=256)
    parser.add_argument("--shutdown_timeout", type=float, default=30.0)
    known, _ = parser.parse_known_args(list(server_args))
    return known.max_request_mib, known.shutdown_timeout


def settings_from_args(ns: argparse.Namespace, server_args: Sequence[str]) -> ScaleSettings:
    max_request_mib, shutdown_timeout = _server_limits(server_args)
    return ScaleSettings(
        idle_timeout=ns.idle_timeout, max_concurrency=ns.max_concurrency, max_processes=ns.max_processes,
        queue_depth=ns.queue_depth, request_timeout=ns.request_timeout, start_timeout=ns.start_timeout,
        probe_hold=ns.probe_hold, drain_timeout=ns.drain_timeout, max_body_bytes=max_request_mib * MiB,
        stop_grace=shutdown_timeout + 5.0,
        backoff=BackoffPolicy(initial=ns.backoff_initial, max=ns.backoff_max, reset=ns.backoff_reset,
                              starts_per_minute=ns.max_starts_per_minute),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns, server_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    settings = settings_from_args(ns, server_args)
    for problem in settings.problems():
        parser.error(problem)
    port = ns.port if ns.port is not None else int(os.environ.get("PORT", "8080"))

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness probe otherwise
    # uvicorn's own start and stop lines would read like a server process's: the activator logs its own.
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)

    from zeroserve.activator.proxy import Activator
    from zeroserve.activator.scaler import Scaler
    from zeroserve.activator.serve import PortTaken, bind, serve
    from zeroserve.activator.telemetry import ActivatorTelemetry

    try:
        sock = bind(ns.host, port)
    except PortTaken as exc:
        print(f"zeroserve dev: {exc}", file=sys.stderr)
        return 1
    telemetry = ActivatorTelemetry.from_environment(os.environ)
    scaler = Scaler(server_args, settings, on_start=telemetry.start_outcome)
    address = f"[{ns.host}]:{port}" if ":" in ns.host else f"{ns.host}:{port}"
    return serve(Activator(scaler, settings, telemetry, address), sock, settings.drain_timeout)


if __name__ == "__main__":
    sys.exit(main())
