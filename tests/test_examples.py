"""Every example runs as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import unused_port

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_serves_and_answers() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py"), "--once", "--port", str(unused_port())],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "cold: POST /v2/models/mlp/infer -> 200" in result.stdout
    assert "warm: POST /v2/models/mlp/infer -> 200" in result.stdout
    assert '"model_name": "mlp"' in result.stdout and '"shape": [1, 4]' in result.stdout
    assert "scaled to zero" in result.stdout
