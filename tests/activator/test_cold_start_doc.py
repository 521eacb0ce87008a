"""docs/cold-start.md draws the trace of one cold call through ``zeroserve dev``: that tree is the one a real call
emits, span for span and parent for child (the plugin's spans in this process, the activator's and the server
process's through OTLP to a receiver on 127.0.0.1)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.activator.conftest import ActivatorProcess, Receiver
from zeroserve import RemoteModel

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "cold-start.md"
Edge = tuple[str | None, str]  # (parent span's name, span's name); None: a root


def documented_edges() -> set[Edge]:
    """The first tree under "## The trace, span by span": rows ``<tree prefix><name>  <service>  ...``."""
    section = DOC.read_text().split("## The trace, span by span", 1)[1]
    block = section.split("```text\n", 1)[1].split("```", 1)[0]
    rows = block.splitlines()[1:]  # the header row names the columns
    edges: set[Edge] = set()
    path: list[str] = []
    for row in rows:
        prefix = row[: len(row) - len(row.lstrip("│├└─ "))]
        depth = len(prefix) // 3
        name = re.split(r"\s{2,}", row[len(prefix):])[0]
        del path[depth:]
        edges.add((path[-1] if path else None, name))
        path.append(name)
    return edges


def test_the_documented_trace_is_the_one_a_cold_call_emits(
    receiver: Receiver, activator: Callable[..., ActivatorProcess]
) -> None:  # the receiver first, so it outlives the activator's flush at exit
    dev = activator("--model_name", "mlp", "--model_dir", str(ROOT / "examples" / "models" / "mlp"), env=receiver.env)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with RemoteModel(dev.url, model="mlp", tracer_provider=provider) as model:
        model.infer({"input": np.full((1, 16), 0.5, dtype=np.float32)})
    client = exporter.get_finished_spans()
    trace_id = client[0].context.trace_id
    # The call and its wake-up agree that they met a cold start, though the activator held one quick probe
    # through it (its Server-Timing says so: activator.start).
    wake = next(span for span in client if span.name.startswith("zeroserve wake"))
    call = next(span for span in client if span.name.startswith("zeroserve infer"))
    assert dict(wake.attributes or {})["zeroserve.coldstart"] is True
    assert dict(call.attributes or {})["zeroserve.coldstart"] is True

    def emitted() -> set[Edge]:
        names: dict[int, str] = {}
        parents: dict[int, int | None] = {}
        for span in client:
            names[span.context.span_id] = span.name
            parents[span.context.span_id] = span.parent.span_id if span.parent is not None else None
        for otlp in receiver.spans():
            if int.from_bytes(otlp.trace_id, "big") == trace_id:
                span_id = int.from_bytes(otlp.span_id, "big")
                names[span_id] = otlp.name
                parents[span_id] = int.from_bytes(otlp.parent_span_id, "big") if otlp.parent_span_id else None
        return {(names.get(parent) if parent is not None else None, names[span_id])
                for span_id, parent in parents.items()}

    dev.stop()  # the activator flushes its spans, and so does the server process it stops
    expected = documented_edges()
    assert len(expected) >= 10, expected  # the block was found and read
    assert emitted() == expected
