"""CloudEvents 1.0 over HTTP on the V2 infer routes, so that Knative Eventing can deliver events to a model and
take its answer back to the Broker (a reply that is not an event is dropped there).

- binary mode: the event's attributes in ``ce-*`` headers, its data the V2 request body as is: JSON, or the binary
  tensor extension with ``Inference-Header-Content-Length``;
- structured mode: ``Content-Type: application/cloudevents+json``, the event one JSON object whose ``data`` (or
  ``data_base64``) is the V2 request, JSON.

The answer is an event in the same mode: a fresh ``id`` and ``time``, ``type`` ``io.kserve.inference.response``
and ``source`` ``io.kserve.inference.<model>`` as KServe's server answers (overridden by the same ``CE_TYPE`` and
``CE_SOURCE`` environment variables), and with ``CE_MERGE=true`` the request's other attributes. Any event type
is accepted: a Trigger chooses what reaches the model. A malformed event is a 400, which Knative's delivery hands
to a dead-letter sink at once rather than retrying (it retries 5xx, 404, 409 and 429).
"""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import orjson

from zeroserve.protocol.binary import HEADER_LENGTH
from zeroserve.runtime.server_errors import InvalidInput
from zeroserve.runtime.settings import EventSettings

STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
SPEC_VERSION = "1.0"
REQUIRED = ("id", "source", "type", "specversion")
_HEADER_PREFIX = b"ce-"
_REQUIRED_HEADER_SET = frozenset(_HEADER_PREFIX + name.encode() for name in REQUIRED)


@dataclass(frozen=True, slots=True)
class Event:
    """An inference request that came as a CloudEvent."""

    mode: Literal["binary", "structured"]
    attributes: dict[str, str]  # every context attribute: id, source, type, specversion, subject, extensions
    data: bytes  # the V2 request body
    header_length: str | None = None  # the binary tensor extension, binary mode only
    data_fields: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.attributes["id"]


def read_event(headers: Mapping[bytes, bytes], body: bytes) -> Event | None:
    """The event a request carries, or None when it is a plain V2 request. Raises InvalidInput (400) for an event
    that is malformed: a required attribute missing, another specversion, a structured event without data."""
    content_type = headers.get(b"content-type")
    if content_type is not None and b"cloudevents" in content_type.lower() and (
        content_type.split(b";", 1)[0].strip().lower() == STRUCTURED_CONTENT_TYPE.encode()
    ):
        return _structured(body)
    # One C-level check of the request's few header names: this runs on every inference request.
    if _REQUIRED_HEADER_SET.isdisjoint(headers):
        return None
    return _binary(headers, body)


def _binary(headers: Mapping[bytes, bytes], body: bytes) -> Event:
    attributes = {
        key[len(_HEADER_PREFIX):].decode("latin-1"): value.decode("latin-1")
        for key, value in headers.items()
        if key.startswith(_HEADER_PREFIX)
    }
    _check(attributes, "binary-mode event (ce-* headers)")
    length = headers.get(HEADER_LENGTH.encode())
    return Event("binary", attributes, body, length.decode("latin-1") if length is not None else None)


def _structured(body: bytes) -> Event:
    try:
        envelope = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"structured CloudEvent is not valid JSON: {exc}") from None
    if not isinstance(envelope, dict):
        raise InvalidInput("structured CloudEvent must be a JSON object")
    attributes = {
        key: value if isinstance(value, str) else orjson.dumps(value).decode()
        for key, value in envelope.items()
        if key not in ("data", "data_base64")
    }
    _check(attributes, "structured CloudEvent")
    if "data" in envelope:
        data = envelope["data"]
        raw = data.encode() if isinstance(data, str) else orjson.dumps(data)
    elif "data_base64" in envelope and isinstance(envelope["data_base64"], str):
        try:
            raw = base64.b64decode(envelope["data_base64"], validate=True)
        except ValueError:
            raise InvalidInput("structured CloudEvent: data_base64 is not valid base64") from None
    else:
        raise InvalidInput("structured CloudEvent has no data: put the V2 inference request in 'data'")
    return Event("structured", attributes, raw)


def _check(attributes: Mapping[str, str], what: str) -> None:
    missing = [name for name in REQUIRED if not attributes.get(name)]
    if missing:
        raise InvalidInput(f"{what} lacks the required attribute(s) {', '.join(missing)}")
    if attributes["specversion"] != SPEC_VERSION:
        raise InvalidInput(f"{what} has specversion {attributes['specversion']!r}; this server speaks {SPEC_VERSION}")


def answer(
    event: Event, settings: EventSettings, model: str, content: bytes, headers: dict[str, str]
) -> tuple[bytes, dict[str, str]]:
    """The V2 answer (``content`` and its ``headers``) as a CloudEvent in the request's mode."""
    attributes: dict[str, str] = {}
    if settings.merge:
        attributes = {key: value for key, value in event.attributes.items() if key not in REQUIRED and key != "time"}
    attributes.update(
        specversion=SPEC_VERSION,
        id=str(uuid.uuid4()),
        type=settings.type,
        source=settings.source or f"io.kserve.inference.{model}",
        time=dt.datetime.now(dt.timezone.utc).isoformat(),
    )
    if event.mode == "binary":
        out = dict(headers)
        out.update({f"ce-{key}": value for key, value in attributes.items()})
        return content, out
    envelope = {**attributes, "datacontenttype": "application/json", "data": orjson.Fragment(content)}
    return orjson.dumps(envelope), {"content-type": STRUCTURED_CONTENT_TYPE}


def span_attributes(event: Event) -> dict[str, str]:
    """The CloudEvents semantic conventions for the request's span."""
    attributes = {
        "cloudevents.event_id": event.id,
        "cloudevents.event_source": event.attributes["source"],
        "cloudevents.event_spec_version": event.attributes["specversion"],
        "cloudevents.event_type": event.attributes["type"],
    }
    if "subject" in event.attributes:
        attributes["cloudevents.event_subject"] = event.attributes["subject"]
    return attributes
