"""``python -m zeroserve.runtime``: the image's entrypoint."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from zeroserve.runtime import memory

    memory.pause_gc_for_startup()  # until loading begins (memory.py)
    try:
        from zeroserve.runtime.config import RuntimeConfig
        from zeroserve.runtime.serve import configure_logging, serve

        config = RuntimeConfig.from_args(sys.argv[1:] if argv is None else argv, os.environ)
        configure_logging(config.log_level)
        return serve(config)
    finally:  # a run that ended before loading began (bad arguments, --help) must not leave it off
        memory.resume_gc(freeze=False)


if __name__ == "__main__":
    sys.exit(main())
