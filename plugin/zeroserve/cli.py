"""The ``zeroserve`` command. ``serve`` hands its arguments to the runtime, imported only then."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: zeroserve <command> [options]

commands:
  serve     serve ONNX models over the Open Inference Protocol (KServe V2); see `zeroserve serve --help`
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "serve":
        try:
            from zeroserve.runtime.__main__ import main as serve_main
        except ImportError as exc:
            if exc.name and exc.name.split(".")[0] in ("starlette", "uvicorn", "numpy", "orjson", "onnxruntime"):
                print(
                    f"zeroserve serve needs the server extras ({exc.name} is missing): "
                    "pip install 'zeroserve[runtime,cpu]'",
                    file=sys.stderr,
                )
                return 2
            raise
        return serve_main(rest)
    print(f"zeroserve: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
    return 2
