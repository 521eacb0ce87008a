"""Starting and stopping ``zeroserve dev`` (real processes): Ctrl-C in a terminal (SIGINT to the whole
process group) during a start and after serving, a second Ctrl-C while draining, SIGTERM, and a port that is
already taken."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.activator.conftest import ActivatorProcess, infer, wait_until

Start = Callable[..., ActivatorProcess]


def stopped_cleanly(dev: ActivatorProcess, signum: int) -> None:
    if signum == signal.SIGINT:
        dev.signal_group(signal.SIGINT)  # what Ctrl-C in a terminal does: every process in the group
    else:
        dev.process.send_signal(signum)
    began = time.monotonic()
    code = dev.process.wait(30)
    log = dev.log()
    assert code == 0, log
    assert time.monotonic() - began < 15, log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    wait_until(lambda: not dev.leftover_children(), 10, "server processes gone")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stop_after_serving(activator: Start, model_dir: Path, signum: int) -> None:
    dev = activator("--model_name", "mlp", "--model_dir", str(model_dir))
    assert infer(dev.url).status_code == 200
    stopped_cleanly(dev, signum)


def test_ctrl_c_during_a_start_answers_the_held_requests(
    activator: Start, gated_model_server: tuple[str, threading.Event], tmp_path: Path
) -> None:
    uri, gate = gated_model_server
    dev = activator("--model_name", "mlp", "--model_dir", uri, "--cache_dir", str(tmp_path / "cache"))
    held: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: held.append(infer(dev.url)))
    thread.start()
    dev.wait_log("Uvicorn running on")  # the server process is up, its model download held at the gate
    stopped_cleanly(dev, signal.SIGINT)
    thread.join(30)
    assert held[0].status_code == 503
    assert held[0].json() == {"error": "zeroserve dev is shutting down"}


def test_a_second_ctrl_c_stops_at_once_and_says_what_went_uncounted(activator: Start, model_dir: Path) -> None:
    dev = activator("--model_name", "mlp", "--model_dir", str(model_dir), "--drain_timeout", "60")
    assert infer(dev.url).status_code == 200

    def trickle() -> Iterator[bytes]:  # a request still arriving holds the first stop's drain open
        yield b'{"inputs": ['
        time.sleep(20)
        yield b"]}"

    thread = threading.Thread(target=lambda: httpx.post(f"{dev.url}/v2/models/mlp/infer", content=trickle(),
                                                          timeout=30), daemon=True)
    thread.start()
    time.sleep(0.3)
    dev.signal_group(signal.SIGINT)
    dev.wait_log("SIGINT: shutting down")
    time.sleep(0.3)
    assert dev.process.poll() is None, dev.log()  # still draining: the second signal finds it
    dev.signal_group(signal.SIGINT)
    code = dev.process.wait(15)
    log = dev.log()
    assert code == 0, log
    assert "SIGINT again: stopping at once" in log
    assert "Traceback" not in log and "CancelledError" not in log, log
    # Killed without being read, the ready process is named in the summary rather than silently left out.
    assert "not counted          1 process(es)" in log, log
    wait_until(lambda: not dev.leftover_children(), 10, "server processes gone")


def test_ctrl_c_while_idle(activator: Start, model_dir: Path) -> None:
    dev = activator("--model_name", "mlp", "--model_dir", str(model_dir))
    stopped_cleanly(dev, signal.SIGINT)


def test_a_taken_port_is_said_to_be_taken(activator: Start, model_dir: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        dev = activator("--model_dir", str(model_dir), port=port, wait=False)
        assert dev.process.wait(30) == 1
    assert f"zeroserve dev: port {port} on 127.0.0.1 is already in use" in dev.log()
    assert "--port" in dev.log() and "Traceback" not in dev.log()
