"""``python -m zeroserve.activator``: the same as ``zeroserve dev``."""

from __future__ import annotations

import sys

from zeroserve.activator.dev import main

if __name__ == "__main__":
    sys.exit(main())
