"""The throughput matrix's axes and the names of its cells, shared by ``run.py`` and ``report.py``.

A cell is one model, one protocol and one concurrency; its key in ``results.json`` is
``<model>_<protocol key>_c<concurrency>`` (``tiny_json_c16``, ``image_binary_c1``, ``large_grpc_c64``).
"""

from __future__ import annotations

MODELS = ("tiny", "image", "large")
# protocol (command-line name) -> (key in a cell's name, label)
PROTOCOLS: dict[str, tuple[str, str]] = {
    "rest-json": ("json", "REST JSON"),
    "rest-binary": ("binary", "REST binary"),
    "grpc": ("grpc", "gRPC"),
}
REST_PROTOCOLS = ("rest-json", "rest-binary")
CONCURRENCY = (1, 4, 16, 64)
QUICK_CONCURRENCY = (1, 16)


def cell(model: str, protocol: str, concurrency: int) -> str:
    """The key of one cell, e.g. ``cell("image", "rest-binary", 16) == "image_binary_c16"``."""
    return f"{model}_{PROTOCOLS[protocol][0]}_c{concurrency}"


def label(protocol: str, concurrency: int) -> str:
    return f"{PROTOCOLS[protocol][1]}, c{concurrency}"
