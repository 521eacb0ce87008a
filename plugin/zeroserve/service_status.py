"""Readiness of a deployed Knative Service or KServe InferenceService: its Ready condition, waiting for it, and
the summary ``zeroserve status`` prints."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from zeroserve.cluster import RESOURCES, Cluster, Manifest, NotFoundError, NotReadyError, ReadyTimeout, resource_of

__all__ = ["Condition", "ServiceStatus", "ready_condition", "status", "wait_ready"]

SERVICE = RESOURCES["serving.knative.dev/v1", "Service"]
REVISION = RESOURCES["serving.knative.dev/v1", "Revision"]
INFERENCE_SERVICE = RESOURCES["serving.kserve.io/v1beta1", "InferenceService"]
WAITABLE = {SERVICE, INFERENCE_SERVICE}


@dataclass(frozen=True, slots=True)
class Condition:
    status: str  # "True", "False" or "Unknown"
    reason: str
    message: str

    def describe(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return f"Ready={self.status}{why}{': ' + self.message if self.message else ''}"


def ready_condition(obj: Mapping[str, Any]) -> Condition:
    """The Ready condition of a Knative or KServe object, Unknown until its controller has seen this generation."""
    status = obj.get("status") or {}
    generation = (obj.get("metadata") or {}).get("generation")
    observed = status.get("observedGeneration")
    if generation is not None and (observed is None or observed < generation):
        return Condition("Unknown", "Reconciling", f"waiting for the controller to see generation {generation}")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Ready":
            return Condition(str(cond.get("status", "Unknown")), cond.get("reason") or "", cond.get("message") or "")
    return Condition("Unknown", "", "no Ready condition yet")


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """What ``zeroserve status`` shows."""

    kind: str
    name: str
    namespace: str
    ready: Condition
    url: str | None
    latest_created: str | None
    latest_ready: str | None
    actual_replicas: int | None
    desired_replicas: int | None
    min_scale: str | None
    max_scale: str | None

    def lines(self) -> list[str]:
        revision = self.latest_ready or "none ready"
        if self.latest_created and self.latest_created != self.latest_ready:
            revision += f" (latest created: {self.latest_created})"
        pods = "unknown" if self.actual_replicas is None else str(self.actual_replicas)
        desired = "unknown" if self.desired_replicas is None else str(self.desired_replicas)
        bounds = f"min {self.min_scale or '0'}, max {self.max_scale or 'unbounded'}"
        return [
            f"{self.kind} {self.name} (namespace {self.namespace})",
            f"  ready     {self.ready.describe()}",
            f"  url       {self.url or 'none yet'}",
            f"  revision  {revision}",
            f"  scale     {pods} pod(s) ready, {desired} desired ({bounds})",
        ]


def wait_ready(
    cluster: Cluster,
    manifest: Mapping[str, Any],
    *,
    timeout: float,
    on_progress: Callable[[str], None] = lambda line: None,
    poll: float = 2.0,
    false_grace: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Manifest:
    """Poll until the applied Service/InferenceService is Ready and return it.

    Knative sets Ready=False briefly during some rollouts, so Ready=False fails the wait only after it has
    lasted ``false_grace`` seconds; ``on_progress`` gets each change of the Ready condition.
    """
    resource = resource_of(manifest)
    meta = manifest["metadata"]
    name, namespace = meta["name"], meta.get("namespace") or cluster.namespace
    deadline = clock() + timeout
    last, false_since = "", None
    while True:
        obj = cluster.get(resource, name, namespace)
        cond = ready_condition(obj)
        if cond.describe() != last:
            last = cond.describe()
            on_progress(f"{name}: {last}")
        if cond.status == "True":
            return obj
        now = clock()
        false_since = (false_since or now) if cond.status == "False" else None
        if false_since is not None and now - false_since >= false_grace:
            raise NotReadyError(f"{meta.get('kind', 'service')} {name} is not ready: {cond.describe()}")
        if now >= deadline:
            raise ReadyTimeout(f"{name} not ready after {timeout:.0f} s: {cond.describe()}")
        sleep(max(0.0, min(poll, deadline - now)))


def status(cluster: Cluster, name: str, *, kserve: bool = False, namespace: str | None = None) -> ServiceStatus:
    """Readiness, URL, latest revision and scale of a Knative Service (or, with ``kserve``, InferenceService)."""
    resource = INFERENCE_SERVICE if kserve else SERVICE
    cluster.require(resource)
    namespace = namespace or cluster.namespace
    obj = cluster.get(resource, name, namespace)
    found = obj.get("status") or {}
    if kserve:
        predictor = (found.get("components") or {}).get("predictor") or {}
        created, ready_rev = predictor.get("latestCreatedRevision"), predictor.get("latestReadyRevision")
        spec = (obj.get("spec") or {}).get("predictor") or {}
        low, high = spec.get("minReplicas"), spec.get("maxReplicas")
        bounds = (None if low is None else str(low), None if high is None else str(high))
    else:
        created, ready_rev = found.get("latestCreatedRevisionName"), found.get("latestReadyRevisionName")
        annotations = (((obj.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("annotations")
        annotations = annotations or {}
        bounds = (
            annotations.get("autoscaling.knative.dev/min-scale"),
            annotations.get("autoscaling.knative.dev/max-scale"),
        )
    actual = desired = None
    revision_name = ready_rev or created
    if revision_name:
        try:
            revision = cluster.get(REVISION, revision_name, namespace)
        except NotFoundError:
            pass
        else:
            actual = (revision.get("status") or {}).get("actualReplicas")
            desired = (revision.get("status") or {}).get("desiredReplicas")
    return ServiceStatus(
        kind=str(obj.get("kind", "Service")),
        name=name,
        namespace=namespace,
        ready=ready_condition(obj),
        url=found.get("url"),
        latest_created=created,
        latest_ready=ready_rev,
        actual_replicas=actual,
        desired_replicas=desired,
        min_scale=bounds[0],
        max_scale=bounds[1],
    )
