"""The zeroserve exception tree.

    ZeroServeError
    └── (client errors arrive with the plugin)

The server's errors (``zeroserve.runtime.errors``) also derive from ``ZeroServeError``.
"""

from __future__ import annotations


class ZeroServeError(Exception):
    """Root of every error zeroserve raises on purpose."""
