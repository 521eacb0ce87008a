"""Knative Eventing manifests that send CloudEvents to a model: a Broker, Triggers that deliver events of a type to
the model's infer route, and a PingSource that sends a fixed V2 request on a schedule. Plain dicts, pure.

How an event travels: a producer posts a CloudEvent (its data a V2 inference request) to the Broker; the Trigger
whose filter matches delivers it to ``/v2/models/NAME/infer`` of the model's Knative Service (or of the
InferenceService, with ``--kserve``), waking it from zero if need be; the server answers with a CloudEvent
(``io.kserve.inference.response``), which the Broker takes back and hands to any Trigger that asks for that type.
Knative's delivery retries 5xx, 404, 409, 429 and network errors with the Trigger's backoff and sends the event to
the dead-letter sink once retries are spent; any other 4xx goes there at once.

A PingSource cannot choose its events' type (always ``dev.knative.sources.ping``), so it marks them with the
extension attribute ``targetmodel`` and a second Trigger delivers exactly those to the model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from zeroserve import podspec
from zeroserve.render_options import Manifest, RenderOptions

__all__ = ["EventingOptions", "broker", "ping_source", "render", "triggers"]

REQUEST_TYPE = "io.kserve.inference.request"  # the counterpart of the server's io.kserve.inference.response
RESPONSE_TYPE = "io.kserve.inference.response"
PING_TYPE = "dev.knative.sources.ping"
TARGET_EXTENSION = "targetmodel"
# A request for the example model (examples/models/mlp: input "input", FP32, [-1, 16]).
EXAMPLE_REQUEST = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}]}
_CRON_FIELD = r"[0-9*/,?LW#-]+|[A-Za-z]{3}(-[A-Za-z]{3})?"


@dataclass(frozen=True, slots=True)
class EventingOptions:
    """How events reach the model.

    Args:
        broker: the Broker the Triggers subscribe to (``default`` is the one a namespace usually has).
        event_type: the CloudEvent type the Trigger delivers to the model.
        schedule: the PingSource's cron schedule (5 fields, or 6 with seconds first, or ``@hourly``-style).
        request: the PingSource's V2 request, as JSON text; default one for the example model.
        dead_letter_sink: where events go once delivery gives up: an http(s) URL, or the name of a Knative
            Service in the namespace.
        retry: delivery attempts after the first; the backoff doubles from 0.5 s.
    """

    broker: str = "default"
    event_type: str = REQUEST_TYPE
    schedule: str = "*/15 * * * *"
    request: str = json.dumps(EXAMPLE_REQUEST, separators=(",", ":"))
    dead_letter_sink: str = "event-display"
    retry: int = 5

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", self.broker) or len(self.broker) > 63:
            raise ValueError(f"broker {self.broker!r} is not a valid Broker name")
        if not self.event_type or any(c.isspace() for c in self.event_type):
            raise ValueError(f"event_type {self.event_type!r} must be a non-empty CloudEvents type without spaces")
        fields = self.schedule.split()
        if not (self.schedule.startswith("@") or (len(fields) in (5, 6) and all(
                re.fullmatch(_CRON_FIELD, f) for f in fields))) or self.schedule.startswith("@every"):
            raise ValueError(f"schedule {self.schedule!r} is not a cron schedule (like '*/15 * * * *' or '@hourly')")
        try:
            request = json.loads(self.request)
        except ValueError as exc:
            raise ValueError(f"request is not JSON: {exc}") from exc
        if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
            raise ValueError("request must be a V2 inference request: a JSON object with a non-empty 'inputs' list")
        if not self.dead_letter_sink.startswith(("http://", "https://")) and not re.fullmatch(
                r"[a-z]([-a-z0-9]*[a-z0-9])?", self.dead_letter_sink):
            raise ValueError(f"dead_letter_sink {self.dead_letter_sink!r} is neither an http(s) URL nor a Service name")
        if not 0 <= self.retry <= 100:
            raise ValueError("retry must be between 0 and 100")


def _model_ref(options: RenderOptions, kserve: bool) -> Manifest:
    if kserve:
        return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "name": options.name}
    return {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": options.name}


def _delivery(options: RenderOptions, events: EventingOptions) -> Manifest:
    if events.dead_letter_sink.startswith(("http://", "https://")):
        sink: Manifest = {"uri": events.dead_letter_sink}
    else:
        sink = {"ref": {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": events.dead_letter_sink}}
    return {
        "retry": events.retry,
        "backoffPolicy": "exponential",
        "backoffDelay": "PT0.5S",
        # One attempt may wait out a cold start: the same bound as the service's responseStartTimeoutSeconds.
        "timeout": f"PT{options.budget.response_start_timeout}S",
        "deadLetterSink": sink,
    }


def broker(options: RenderOptions, events: EventingOptions) -> Manifest:
    """The Broker producers post to; the cluster's default broker class."""
    return {
        "apiVersion": "eventing.knative.dev/v1",
        "kind": "Broker",
        "metadata": podspec.metadata(events.broker, options.namespace),
    }


def triggers(options: RenderOptions, events: EventingOptions, *, kserve: bool = False) -> list[Manifest]:
    """The Trigger for events of ``event_type``, and the one for the PingSource's events marked for this model."""
    subscriber = {"ref": _model_ref(options, kserve), "uri": f"/v2/models/{options.served_name}/infer"}
    filters = [
        (options.name, {"type": events.event_type}),
        (f"{options.name[:58]}-ping", {"type": PING_TYPE, TARGET_EXTENSION: options.served_name}),
    ]
    return [
        {
            "apiVersion": "eventing.knative.dev/v1",
            "kind": "Trigger",
            "metadata": podspec.metadata(name, options.namespace),
            "spec": {
                "broker": events.broker,
                "filter": {"attributes": attributes},
                "subscriber": dict(subscriber),
                "delivery": _delivery(options, events),
            },
        }
        for name, attributes in filters
    ]


def ping_source(options: RenderOptions, events: EventingOptions) -> Manifest:
    """A PingSource posting the fixed V2 request to the Broker on the schedule, marked for this model."""
    return {
        "apiVersion": "sources.knative.dev/v1",
        "kind": "PingSource",
        "metadata": podspec.metadata(f"{options.name[:58]}-ping", options.namespace),
        "spec": {
            "schedule": events.schedule,
            "contentType": "application/json",
            "data": events.request,
            "ceOverrides": {"extensions": {TARGET_EXTENSION: options.served_name}},
            "sink": {"ref": {"apiVersion": "eventing.knative.dev/v1", "kind": "Broker", "name": events.broker}},
        },
    }


def render(options: RenderOptions, events: EventingOptions, *, kserve: bool = False) -> list[Manifest]:
    """The Broker, the two Triggers and the PingSource for the model ``options`` describes."""
    if options.serves_repository:
        raise ValueError(
            f"eventing delivers to one model's infer route: render it for a service with one model, not "
            f"model_loading {options.model_loading}"
        )
    return [broker(options, events), *triggers(options, events, kserve=kserve), ping_source(options, events)]


def explain(options: RenderOptions, events: EventingOptions, *, kserve: bool = False) -> list[str]:
    """Comment lines for the top of a rendered eventing file."""
    target = f"InferenceService {options.name}" if kserve else f"Knative Service {options.name}"
    sink = events.dead_letter_sink
    if not sink.startswith(("http://", "https://")):
        sink += " (a Knative Service you deploy, e.g. Knative's event_display)"
    return [
        f"Knative Eventing for model {options.served_name} ({target}), by `zeroserve render --eventing`.",
        f"Events of type {events.event_type} posted to Broker {events.broker} go to "
        f"/v2/models/{options.served_name}/infer;",
        f"  the model answers with a CloudEvent of type {RESPONSE_TYPE}, which goes back to the Broker.",
        f"PingSource {options.name[:58]}-ping posts a fixed V2 request on '{events.schedule}'; its type is always",
        f"  {PING_TYPE}, so it carries {TARGET_EXTENSION}={options.served_name} for the second Trigger.",
        f"Delivery: {events.retry} retries, exponential backoff from 0.5 s, each attempt up to "
        f"{options.budget.response_start_timeout} s (a cold start).",
        "  5xx, 404, 409, 429 and network errors are retried; other 4xx go to the dead-letter sink at once,",
        f"  as do events whose retries are spent: {sink}",
    ]
