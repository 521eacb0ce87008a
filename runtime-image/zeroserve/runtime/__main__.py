"""``python -m zeroserve.runtime``: the image's entrypoint."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn


def main(argv: Sequence[str] | None = None) -> int:
    from zeroserve.runtime import memory

    memory.pause_gc_for_startup()  # until loading begins (memory.py)
    try:
        from zeroserve.runtime.config import RuntimeConfig
        from zeroserve.runtime.serve import configure_logging, serve

        config = RuntimeConfig.from_args(sys.argv[1:] if argv is None else argv, os.environ)
        configure_logging(config.log_level)
        return serve(config)
    except KeyboardInterrupt:  # Ctrl-C before the server's own handlers were installed: no traceback
        return 130
    finally:  # a run that ended before loading began (bad arguments, --help) must not leave it off
        memory.resume_gc(freeze=False)


def exit_now(code: int) -> NoReturn:
    """End the process without finalizing the interpreter: a thread of ONNX Runtime may still be running (a
    session built in the background, a TensorRT build), and tearing the interpreter down under it aborts the
    process. The server has flushed its telemetry and drained its requests by now."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
