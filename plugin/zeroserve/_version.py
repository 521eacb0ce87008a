"""The installed package's version, for spans, server metadata and ``zeroserve --version``. A leaf: it imports
nothing of ours, so any module may use it without pulling others in."""

from __future__ import annotations

import functools


@functools.cache
def version() -> str:
    """The version of the installed ``zeroserve`` distribution; ``0+unknown`` in a source tree never installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("zeroserve")
    except PackageNotFoundError:
        return "0+unknown"
