"""Prometheus metrics for ``GET /metrics``, in the text exposition format.

Hand-rolled on purpose: a few counters and histograms per model do not need a client library on the
cold-start path, and recording one request costs a handful of dict and list operations.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import Literal

# Seconds: from 100 us (a tiny model's run) to 10 s (a large image batch on CPU).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Seconds to load a model: from a tiny graph (tens of ms) to a TensorRT build (minutes).
LOAD_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

Labels = tuple[tuple[str, str], ...]
Protocol = Literal["rest", "grpc"]  # the transport a request came in on: the `protocol` label


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help_text, buckets
        self._series: dict[Labels, list[float]] = {}  # bucket counts..., then sum, then count

    def observe(self, labels: Labels, value: float) -> None:
        _add(self.series(labels), self.buckets, value)

    def series(self, labels: Labels) -> list[float]:
        """The counts of one series (created empty), for ``_add``: a caller that observes the same labels on every
        request keeps it rather than build and hash its labels each time."""
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [0.0] * (len(self.buckets) + 2)
        return series

    def render(self) -> Iterator[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for labels, series in self._series.items():
            cumulative = 0.0
            for bound, count in zip(self.buckets, series):
                cumulative += count
                yield f"{self.name}_bucket{_format(labels, ('le', _number(bound)))} {_number(cumulative)}"
            yield f"{self.name}_bucket{_format(labels, ('le', '+Inf'))} {_number(series[-1])}"
            yield f"{self.name}_sum{_format(labels)} {series[-2]!r}"
            yield f"{self.name}_count{_format(labels)} {_number(series[-1])}"


def _add(series: list[float], buckets: tuple[float, ...], value: float) -> None:
    index = bisect.bisect_left(buckets, value)  # first bucket whose bound is >= value
    if index < len(buckets):
        series[index] += 1
    series[-2] += value
    series[-1] += 1


class Counter:
    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help = name, help_text
        self._values: dict[Labels, list[float]] = {}  # a one-item list per series, which a caller may keep

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        self.cell(labels)[0] += amount

    def cell(self, labels: Labels) -> list[float]:
        """One series' value as a one-item list (created at 0), to add to without its labels' lookup."""
        cell = self._values.get(labels)
        if cell is None:
            cell = self._values[labels] = [0.0]
        return cell

    def render(self) -> Iterator[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for labels, (value,) in self._values.items():
            yield f"{self.name}{_format(labels)} {_number(value)}"


class Gauge:
    """A gauge read at scrape time from a callback returning {labels: value}."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], dict[Labels, float]]) -> None:
        self.name, self.help, self.read = name, help_text, read

    def render(self) -> Iterator[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for labels, value in self.read().items():
            yield f"{self.name}{_format(labels)} {_number(value)}"


class CallbackCounter(Gauge):
    """A counter kept elsewhere (its name ends in ``_total``), read at scrape time like a gauge."""

    kind = "counter"


class _RequestSeries:
    """The series one (model, version, protocol) adds its answered requests to."""

    __slots__ = ("labels", "seconds", "outcomes")

    def __init__(self, labels: Labels, seconds: list[float]) -> None:
        self.labels = labels
        self.seconds = seconds
        self.outcomes: dict[str, list[float]] = {}


class ServerMetrics:
    def __init__(self) -> None:
        self.requests = Counter("zeroserve_inference_requests_total", "Inference requests answered, by outcome")
        self.request_seconds = Histogram(
            "zeroserve_inference_request_duration_seconds", "Time from request received to answer", LATENCY_BUCKETS
        )
        self.queue_seconds = Histogram(
            "zeroserve_inference_queue_duration_seconds", "Time waiting for a batch and a thread", LATENCY_BUCKETS
        )
        self.compute_seconds = Histogram(
            "zeroserve_inference_compute_duration_seconds", "Time in session.run", LATENCY_BUCKETS
        )
        self.batch_size = Histogram("zeroserve_batch_size", "Rows per session.run that served a request", BATCH_BUCKETS)
        self._gauges: list[Gauge] = []
        self._counters: list[Counter] = []
        self._histograms: list[Histogram] = []
        # The series one request adds to, by (model, version, protocol) and by (model, version): every request
        # observes six series, and their labels are few.
        self._request_series: dict[tuple[str, str, str], _RequestSeries] = {}
        self._run_series: dict[tuple[str, str], tuple[list[float], list[float], list[float]]] = {}

    def add_gauge(self, gauge: Gauge) -> None:
        self._gauges.append(gauge)

    def add_counter_callback(self, counter: CallbackCounter) -> None:
        self._gauges.append(counter)

    def add_counter(self, counter: Counter) -> None:
        self._counters.append(counter)

    def add_histogram(self, histogram: Histogram) -> None:
        self._histograms.append(histogram)

    def add_gauge_value(self, name: str, help_text: str, value: float) -> None:
        """A gauge that never changes (a setting worth seeing beside the counters it scales)."""
        self._gauges.append(Gauge(name, help_text, lambda: {(): value}))

    def observe(self, model: str, version: str, status: int, seconds: float, protocol: Protocol) -> None:
        """One answered inference request. ``status`` is the HTTP status, for gRPC that of the error it
        was answered with (``errors.py``), so both protocols count outcomes alike."""
        key = (model, version, protocol)
        series = self._request_series.get(key)
        if series is None:
            labels = (("model", model), ("version", version), ("protocol", protocol))
            series = self._request_series[key] = _RequestSeries(labels, self.request_seconds.series(labels))
        outcome = "success" if status < 400 else "failure"
        cell = series.outcomes.get(outcome)
        if cell is None:  # created when first counted: /metrics shows the outcomes that happened
            cell = series.outcomes[outcome] = self.requests.cell((*series.labels, ("outcome", outcome)))
        cell[0] += 1
        _add(series.seconds, LATENCY_BUCKETS, seconds)

    def observe_run(self, model: str, version: str, queue: float, compute: float, batch_size: int) -> None:
        key = (model, version)
        series = self._run_series.get(key)
        if series is None:
            labels = (("model", model), ("version", version))
            series = self._run_series[key] = (
                self.queue_seconds.series(labels), self.compute_seconds.series(labels), self.batch_size.series(labels)
            )
        _add(series[0], LATENCY_BUCKETS, queue)
        _add(series[1], LATENCY_BUCKETS, compute)
        _add(series[2], BATCH_BUCKETS, batch_size)

    def render(self) -> str:
        families: list[Counter | Histogram | Gauge] = [
            self.requests, self.request_seconds, self.queue_seconds, self.compute_seconds, self.batch_size,
            *self._counters, *self._histograms, *self._gauges,
        ]
        lines = [line for family in families for line in family.render()]
        return "\n".join(lines) + "\n"


def _format(labels: Labels, *extra: tuple[str, str]) -> str:
    pairs = [*labels, *extra]
    if not pairs:
        return ""
    inner = ",".join(f'{key}="{_escape(value)}"' for key, value in pairs)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
