"""The activator's lifecycle, and the one place its signals are handled.

Order: bind the port (a taken port is an error that says so, before anything else runs); serve; on the first
SIGINT or SIGTERM, drain: stop accepting, answer held requests, stop the start in progress, let forwarded
requests finish for up to ``--drain_timeout`` seconds; then stop every server process (SIGTERM, SIGKILL after
its grace) and flush telemetry. A second signal skips the waiting. Whatever happens, no server process
outlives the activator. A stop on a signal is a clean stop: exit status 0, no traceback.

Server processes run in sessions of their own (``process.py``), so a Ctrl-C in the terminal reaches them only
through this shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import signal
import socket
import sys
from collections.abc import Iterator

import uvicorn

from zeroserve.activator.proxy import Activator

logger = logging.getLogger("zeroserve.activator")


class PortTaken(Exception):
    pass


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; PortTaken when something else holds it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT from a last run is no conflict
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortTaken(f"port {port} on {host} is already in use; stop what holds it or pick another "
                            "port with --port") from None
        raise PortTaken(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # signals are handled by serve() below, and never raised again after the shutdown


def serve(app: Activator, sock: socket.socket, drain_timeout: float) -> int:
    """Serve ``app`` on ``sock`` until a signal; the exit status (0 after a clean stop)."""
    config = uvicorn.Config(
        app, lifespan="on", log_config=None, access_log=False, server_header=False,
        timeout_graceful_shutdown=max(1, math.ceil(drain_timeout)),
    )
    server = _Server(config)

    def on_signal(signum: int) -> None:
        if server.should_exit:
            logger.warning("%s again: stopping at once", signal.Signals(signum).name)
            server.force_exit = True
            app.scaler.kill_all()
            return
        logger.info("%s: shutting down", signal.Signals(signum).name)
        app.drain()
        server.should_exit = True

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            await server.serve(sockets=[sock])
        finally:
            if server.force_exit:  # uvicorn skips the lifespan's shutdown then: stop the processes here
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(app.scaler.close(), 5.0)

    try:
        with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
            runner.run(main())
    finally:
        app.scaler.kill_all()
        sock.close()
    if server.started:
        print(app.scaler.billing.summary(), file=sys.stderr, flush=True)
    return 0 if server.started else 1
