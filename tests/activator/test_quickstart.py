"""The README's first command, ``./scripts/quickstart``: it serves and answers, says so when its port is
taken, and installs only when the dependencies changed."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import unused_port

ROOT = Path(__file__).resolve().parents[2]


def test_a_taken_port_is_named_with_a_way_out() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--once", "--port",
                                 str(port)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert f"./scripts/quickstart --port {port + 1}" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "cold:" not in result.stdout  # nothing was sent to whatever holds the port


@pytest.mark.skipif(Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
                    reason="scripts/quickstart installs into the repository's .venv; these tests run elsewhere")
def test_the_second_run_skips_the_install() -> None:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(ROOT / "scripts" / "quickstart"), "--once", "--idle_timeout", "1", "--port",
                               str(unused_port())], capture_output=True, text=True, timeout=300)

    first = run()  # installs when .venv was installed otherwise (scripts/test) or pyproject.toml changed
    assert first.returncode == 0, first.stderr
    second = run()
    assert second.returncode == 0, second.stderr
    assert "quickstart: .venv is up to date" in second.stderr and "pip" not in second.stderr
    for result in (first, second):
        assert "cold: POST /v2/models/mlp/infer -> 200" in result.stdout
        assert "warm: POST /v2/models/mlp/infer -> 200" in result.stdout
        assert "scaled to zero" in result.stdout
