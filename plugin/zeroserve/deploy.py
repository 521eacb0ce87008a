"""``zeroserve deploy``: apply manifests to the current Kubernetes context, then wait until they are Ready.

The connection and the API calls are ``zeroserve.cluster``'s (its docstring lists every call and the error
tree); readiness and ``zeroserve status`` are ``zeroserve.service_status``'s. The names a caller needs are
exported here too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from zeroserve.cluster import (
    Cluster,
    DeployError,
    Manifest,
    MissingAPIError,
    NoClusterError,
    NotFoundError,
    NotReadyError,
    ReadyTimeout,
    resource_of,
)
from zeroserve.service_status import WAITABLE, ServiceStatus, ready_condition, status, wait_ready

__all__ = [
    "Cluster", "DeployError", "MissingAPIError", "NoClusterError", "NotFoundError", "NotReadyError", "ReadyTimeout",
    "ServiceStatus", "deploy", "ready_condition", "ready_timeout", "status", "urls", "wait_ready",
]

DEFAULT_PROGRESS_DEADLINE = 600.0  # Knative's, in seconds


def ready_timeout(manifest: Mapping[str, Any]) -> float:
    """How long to wait for Ready: the manifest's progress deadline (Knative's default 600 s) plus a minute."""
    meta = manifest.get("metadata") or {}
    template_meta = ((manifest.get("spec") or {}).get("template") or {}).get("metadata") or {}
    key = "serving.knative.dev/progress-deadline"
    text = (template_meta.get("annotations") or {}).get(key) or (meta.get("annotations") or {}).get(key)
    return (_seconds(str(text)) if text else DEFAULT_PROGRESS_DEADLINE) + 60.0


def _seconds(text: str) -> float:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0}
    total, number = 0.0, ""
    for char in text.strip():
        if char.isdigit() or char == ".":
            number += char
        elif char in units and number:
            total, number = total + float(number) * units[char], ""
        else:
            return DEFAULT_PROGRESS_DEADLINE  # not a plain duration; Knative's default
    return total + (float(number) if number else 0.0)


def deploy(
    cluster: Cluster,
    manifests: Sequence[Mapping[str, Any]],
    *,
    wait: bool = True,
    timeout: float | None = None,
    on_progress: Callable[[str], None] = lambda line: None,
    poll: float = 2.0,
    false_grace: float = 30.0,
) -> list[Manifest]:
    """Apply every manifest in order, then wait for each Service/InferenceService among them to be Ready.

    Returns the objects as last read (applied, or Ready when waited for). All kinds are checked before
    anything is applied, so a missing Knative or KServe fails the deploy without half-applying it.
    """
    for manifest in manifests:
        cluster.require(resource_of(manifest))
    applied = []
    for manifest in manifests:
        obj = cluster.apply(manifest)
        on_progress(f"applied {obj.get('kind')} {(obj.get('metadata') or {}).get('name')}")
        applied.append(obj)
    if not wait:
        return applied
    result = []
    for manifest, obj in zip(manifests, applied):
        if resource_of(manifest) in WAITABLE:
            wait_for = timeout if timeout is not None else ready_timeout(manifest)
            obj = wait_ready(
                cluster, obj, timeout=wait_for, on_progress=on_progress, poll=poll, false_grace=false_grace
            )
        result.append(obj)
    return result


def urls(objects: Sequence[Mapping[str, Any]]) -> Iterator[str]:
    """The status URLs among deployed objects."""
    for obj in objects:
        url = (obj.get("status") or {}).get("url")
        if url:
            yield str(url)
