"""An OTLP/HTTP receiver on 127.0.0.1 for tests of what a real process exports (traces and metrics)."""

from __future__ import annotations

import http.server
import threading

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan


class Receiver:
    """An OTLP/HTTP receiver on 127.0.0.1 (protobuf; ``/v1/traces`` and ``/v1/metrics``) that keeps all."""

    def __init__(self) -> None:
        self.traces: list[ExportTraceServiceRequest] = []
        self.metrics: list[ExportMetricsServiceRequest] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    receiver.traces.append(ExportTraceServiceRequest.FromString(body))
                elif self.path == "/v1/metrics":
                    receiver.metrics.append(ExportMetricsServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.env = {"OTEL_EXPORTER_OTLP_ENDPOINT": self.url, "OTEL_BSP_SCHEDULE_DELAY": "100",
                    "OTEL_METRIC_EXPORT_INTERVAL": "200"}
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def spans(self, service: str | None = None) -> list[OtlpSpan]:
        return [
            span
            for request in self.traces
            for resource in request.resource_spans
            if service is None or _service(resource.resource.attributes) == service
            for scope in resource.scope_spans
            for span in scope.spans
        ]

    def metric_names(self, service: str) -> set[str]:
        return {
            metric.name
            for request in self.metrics
            for resource in request.resource_metrics
            if _service(resource.resource.attributes) == service
            for scope in resource.scope_metrics
            for metric in scope.metrics
        }

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _service(attributes: object) -> str:
    return next((a.value.string_value for a in attributes if a.key == "service.name"), "")  # type: ignore[attr-defined]
