"""Shared by the tests of rendering and the command line."""

from __future__ import annotations

import pytest

from zeroserve import cli


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``zeroserve ARGS`` in this process: its exit code, stdout and stderr."""
    try:
        code = cli.main(args)
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
