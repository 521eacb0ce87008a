"""Where an on-demand server's index time goes: the server, unchanged, with timers around the steps of the index.

    python bench/index_probe.py --model_dir s3://bucket --model_loading on_demand [other server flags]

runs ``python -m zeroserve.runtime`` with those flags in this process, after wrapping (not changing) what
``loader.index_models`` calls: botocore's import and client (``DirectS3()``), the listing request (botocore's
HTTP send and wait, and its XML parser), ``layout.discover_listing``, the ``OnnxModel`` objects, and the garbage
collector's passes meanwhile (``gc.callbacks``). When the index ends it writes one line to stderr, ``INDEX_PROBE``
and a JSON object of milliseconds, which multi_model.py reads from the server's log. The timers cost a little
themselves, so read the parts against the probe's own ``index_total``, not against an unprobed launch.

``parse_times(body)`` times botocore's ListObjectsV2 parser and ElementTree on the same listing body.
"""

from __future__ import annotations

import gc
import json
import runpy
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

PREFIX = "INDEX_PROBE "


def parse_times(body: bytes, repeat: int = 5) -> dict[str, float]:
    """Median ms to parse one ListObjectsV2 answer with botocore's parser, and with ElementTree (keys and sizes)."""
    import xml.etree.ElementTree as ET

    import botocore.session
    from botocore.parsers import RestXMLParser

    shape = botocore.session.get_session().get_service_model("s3").operation_model("ListObjectsV2").output_shape
    response = {"body": body, "headers": {}, "status_code": 200}

    def element_tree() -> int:
        root = ET.fromstring(body)
        ns = root.tag.partition("}")[0] + "}"
        return len([(e.findtext(f"{ns}Key"), e.findtext(f"{ns}Size")) for e in root.iter(f"{ns}Contents")])

    def median_ms(fn: Callable[[], Any]) -> float:
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return round(statistics.median(times) * 1000, 2)

    return {
        "botocore_ms": median_ms(lambda: RestXMLParser().parse(response, shape)),
        "element_tree_ms": median_ms(element_tree),
        "body_bytes": len(body),
        "keys": element_tree(),
    }


def _probe(argv: list[str]) -> None:
    times: dict[str, float] = {}
    counts = {"gc_passes": 0, "gc_full_passes": 0}
    gc_started: dict[int, float] = {}
    window = threading.Event()

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if not window.is_set():
            return
        if phase == "start":
            gc_started[threading.get_ident()] = time.perf_counter()
        elif (started := gc_started.pop(threading.get_ident(), None)) is not None:
            times["gc"] = times.get("gc", 0.0) + time.perf_counter() - started
            counts["gc_passes"] += 1
            counts["gc_full_passes"] += info["generation"] == 2

    def timed(owner: Any, name: str, key: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                times[key] = times.get(key, 0.0) + time.perf_counter() - started

        setattr(owner, name, wrapper)

    from zeroserve.runtime import loader, s3_direct

    gc.callbacks.append(on_gc)
    made_client = s3_direct.DirectS3.__init__

    def make_client(self: Any) -> None:
        started = time.perf_counter()
        made_client(self)
        times["botocore_import_and_client"] = time.perf_counter() - started
        import botocore.endpoint
        import botocore.parsers

        if not hasattr(botocore.parsers, "_zeroserve_probed"):  # botocore is imported by now: time its parts
            botocore.parsers._zeroserve_probed = True  # type: ignore[attr-defined]
            timed(botocore.parsers.ResponseParser, "parse", "botocore_parse")
            timed(botocore.endpoint.Endpoint, "_send", "http_send_and_wait")

    s3_direct.DirectS3.__init__ = make_client  # type: ignore[method-assign]
    timed(s3_direct.DirectS3, "find", "list_request")
    timed(loader.storage, "list_files", "list_files")
    timed(loader.layout, "discover_listing", "discover_listing")
    timed(loader, "OnnxModel", "onnx_model_objects")
    index_models = loader.index_models

    async def probed_index(*args: Any, **kwargs: Any) -> None:
        window.set()
        started = time.perf_counter()
        try:
            await index_models(*args, **kwargs)
        finally:
            times["index_total"] = time.perf_counter() - started
            window.clear()
            ms = {key: round(value * 1000, 1) for key, value in times.items()}
            print(PREFIX + json.dumps({**ms, **counts}), file=sys.stderr, flush=True)

    loader.index_models = probed_index  # type: ignore[assignment]
    sys.argv = ["zeroserve.runtime", *argv]
    runpy.run_module("zeroserve.runtime", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _probe(sys.argv[1:])
