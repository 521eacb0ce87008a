"""``python -m zeroserve.runtime``: the image's entrypoint."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from zeroserve.runtime.config import RuntimeConfig
    from zeroserve.runtime.serve import configure_logging, serve

    config = RuntimeConfig.from_args(sys.argv[1:] if argv is None else argv, os.environ)
    configure_logging(config.log_level)
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
