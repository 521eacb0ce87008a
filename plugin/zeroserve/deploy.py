"""Apply manifests to the current Kubernetes context, wait until they are Ready, report their status.

Uses the official ``kubernetes`` client (extra ``deploy``) with the kubeconfig and context kubectl would use
(``KUBECONFIG`` or ``~/.kube/config``; the pod's service account when neither exists inside a cluster), and
server-side apply, so re-deploying changed options updates the fields zeroserve owns. The only calls made:

    GET    /apis/GROUP/VERSION                                    is Knative Serving / KServe installed?
    PATCH  /apis/GROUP/VERSION[/namespaces/NS]/PLURAL/NAME        server-side apply (fieldManager=zeroserve)
    GET    /apis/GROUP/VERSION/namespaces/NS/PLURAL/NAME          status, while waiting and for ``status``

Errors (``DeployError`` and below, under ``ZeroServeError``):

    DeployError           the cluster refused or failed the request; the message says what to do
    ├── NoClusterError    no kubeconfig or context, or the API server cannot be reached
    ├── MissingAPIError   Knative Serving or KServe is not installed (its API group is not served)
    ├── NotFoundError     the named service does not exist (also a LookupError)
    ├── NotReadyError     the service reports Ready=False and stays so
    └── ReadyTimeout      not Ready within the timeout (also a TimeoutError)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from zeroserve.errors import ZeroServeError

try:
    import kubernetes.client
    import kubernetes.config
    import urllib3.exceptions
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.config_exception import ConfigException
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    if (exc.name or "").split(".")[0] not in ("kubernetes", "urllib3"):
        raise
    raise ImportError(
        "zeroserve deploy and status need the Kubernetes client: pip install 'zeroserve[deploy]'", name=exc.name
    ) from exc

Manifest = dict[str, Any]
FIELD_MANAGER = "zeroserve"
REQUEST_TIMEOUT = 30.0  # seconds per API call


class DeployError(ZeroServeError):
    """Deploying or inspecting a service failed; ``str(error)`` says why and what to do."""


class NoClusterError(DeployError):
    """No usable kubeconfig or context, or the API server did not answer."""


class MissingAPIError(DeployError):
    """The cluster does not serve the API group a manifest needs (Knative Serving or KServe not installed)."""


class NotFoundError(DeployError, LookupError):
    """The named service does not exist in the namespace."""


class NotReadyError(DeployError):
    """The service reported Ready=False for longer than the grace period."""


class ReadyTimeout(DeployError, TimeoutError):
    """The service did not become Ready within the timeout."""


@dataclass(frozen=True, slots=True)
class Resource:
    """Where a kind lives in the API."""

    group: str
    version: str
    plural: str
    namespaced: bool
    installs: str  # what to install when the group is missing

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


KNATIVE = "Knative Serving (https://knative.dev/docs/install/)"
KSERVE = "KServe in Knative mode (https://kserve.github.io/website/docs/admin-guide/serverless)"
RESOURCES: Mapping[tuple[str, str], Resource] = {
    ("serving.knative.dev/v1", "Service"): Resource("serving.knative.dev", "v1", "services", True, KNATIVE),
    ("serving.knative.dev/v1", "Revision"): Resource("serving.knative.dev", "v1", "revisions", True, KNATIVE),
    ("serving.kserve.io/v1beta1", "InferenceService"): Resource(
        "serving.kserve.io", "v1beta1", "inferenceservices", True, KSERVE
    ),
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): Resource(
        "serving.kserve.io", "v1alpha1", "servingruntimes", True, KSERVE
    ),
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): Resource(
        "serving.kserve.io", "v1alpha1", "clusterservingruntimes", False, KSERVE
    ),
}
SERVICE = RESOURCES["serving.knative.dev/v1", "Service"]
REVISION = RESOURCES["serving.knative.dev/v1", "Revision"]
INFERENCE_SERVICE = RESOURCES["serving.kserve.io/v1beta1", "InferenceService"]
WAITABLE = {SERVICE, INFERENCE_SERVICE}


def resource_of(manifest: Mapping[str, Any]) -> Resource:
    """The API resource of a manifest; raises DeployError for kinds zeroserve does not apply."""
    key = (str(manifest.get("apiVersion")), str(manifest.get("kind")))
    found = RESOURCES.get(key)
    if found is None:
        kinds = ", ".join(f"{kind} ({api})" for api, kind in RESOURCES)
        raise DeployError(f"zeroserve deploy applies {kinds}; use kubectl apply for {key[1]} ({key[0]})")
    return found


def ready_timeout(manifest: Mapping[str, Any]) -> float:
    """How long to wait for Ready: the manifest's progress deadline (Knative's default 600 s) plus a minute."""
    meta = manifest.get("metadata") or {}
    template_meta = ((manifest.get("spec") or {}).get("template") or {}).get("metadata") or {}
    key = "serving.knative.dev/progress-deadline"
    text = (template_meta.get("annotations") or {}).get(key) or (meta.get("annotations") or {}).get(key) or "600s"
    return _seconds(str(text)) + 60.0


def _seconds(text: str) -> float:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0}
    total, number = 0.0, ""
    for char in text.strip():
        if char.isdigit() or char == ".":
            number += char
        elif char in units and number:
            total, number = total + float(number) * units[char], ""
        else:
            return 600.0  # not a plain duration; Knative's default
    return total + (float(number) if number else 0.0)


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


class Cluster:
    """The API server of one kubeconfig context, and the namespace used when a manifest names none."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        self.api = kubernetes.client.CustomObjectsApi(api_client)
        self.host: str = api_client.configuration.host
        self.namespace = namespace
        self._served: dict[str, set[str]] = {}

    @classmethod
    def connect(
        cls,
        *,
        kubeconfig: str | None = None,
        context: str | None = None,
        namespace: str | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> Cluster:
        """Load the kubeconfig the way kubectl does; raises NoClusterError when there is none to use."""
        path = kubeconfig or environ.get("KUBECONFIG") or os.path.join(os.path.expanduser("~"), ".kube", "config")
        paths = [p for p in path.split(os.pathsep) if p]
        try:
            if any(os.path.exists(p) for p in paths):
                api_client = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
                    config_file=path, context=context
                )
                namespace = namespace or _context_namespace(path, context)
            elif not kubeconfig and environ.get("KUBERNETES_SERVICE_HOST") and not context:
                configuration = kubernetes.client.Configuration()
                kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
                    client_configuration=configuration
                )
                api_client = kubernetes.client.ApiClient(configuration)
                namespace = namespace or _pod_namespace()
            else:
                raise NoClusterError(
                    f"no Kubernetes cluster configured: {path} does not exist. zeroserve uses the current "
                    "kubeconfig context like kubectl; set KUBECONFIG or pass --kubeconfig"
                )
        except ConfigException as exc:
            raise NoClusterError(f"cannot use the kubeconfig {path}: {exc}") from exc
        return cls(api_client, namespace or "default")

    # -- calls ---------------------------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, missing_ok: bool = False, **kwargs: Any) -> Any:
        """Make one API call; with ``missing_ok`` a 404 returns None instead of raising."""
        try:
            return fn(*args, _request_timeout=REQUEST_TIMEOUT, **kwargs)
        except ApiException as exc:
            if missing_ok and exc.status == 404:
                return None
            raise _api_error(what, exc) from exc
        except urllib3.exceptions.HTTPError as exc:
            raise NoClusterError(f"cannot reach the Kubernetes API server at {self.host} ({what}): {exc}") from exc

    def require(self, resource: Resource) -> None:
        """Raise MissingAPIError unless the cluster serves ``resource`` (cached per API group version)."""
        served = self._served.get(resource.api_version)
        if served is None:
            found = self._call(
                f"discovering {resource.api_version}",
                self.api.get_api_resources,
                resource.group,
                resource.version,
                missing_ok=True,
            )
            served = set() if found is None else {r.name for r in found.resources}
            self._served[resource.api_version] = served
        if resource.plural not in served:
            raise MissingAPIError(
                f"the cluster at {self.host} does not serve {resource.plural}.{resource.api_version}: "
                f"install {resource.installs}"
            )

    def apply(self, manifest: Mapping[str, Any]) -> Manifest:
        """Server-side apply of one manifest (forcing conflicts, like a controller that owns these fields)."""
        resource = resource_of(manifest)
        self.require(resource)
        body = json.loads(json.dumps(manifest))  # a plain copy
        name = body["metadata"]["name"]
        what = f"applying {body['kind']} {name}"
        patch: Callable[..., Any]
        if resource.namespaced:
            namespace = body["metadata"].setdefault("namespace", self.namespace)
            patch = self.api.patch_namespaced_custom_object
            args: tuple[str, ...] = (resource.group, resource.version, namespace, resource.plural, name)
        else:
            patch = self.api.patch_cluster_custom_object
            args = (resource.group, resource.version, resource.plural, name)
        # The raw response: the generated client decodes only 200, and an apply that creates answers 201.
        response = self._call(
            what,
            patch,
            *args,
            body,
            field_manager=FIELD_MANAGER,
            force=True,
            _content_type="application/apply-patch+yaml",
            _preload_content=False,
        )
        result: Manifest = json.loads(response.data)
        return result

    def get(self, resource: Resource, name: str, namespace: str | None = None) -> Manifest:
        """Read one namespaced object; raises NotFoundError when it does not exist."""
        namespace = namespace or self.namespace
        kind = resource.plural[:-1]
        obj: Manifest | None = self._call(
            f"reading {kind} {name}",
            self.api.get_namespaced_custom_object,
            *(resource.group, resource.version, namespace, resource.plural, name),
            missing_ok=True,
        )
        if obj is None:
            raise NotFoundError(f"no {kind} {name!r} in namespace {namespace}")
        return obj

    # -- waiting and status ----------------------------------------------------------------------------------

    def wait_ready(
        self,
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
        name, namespace = meta["name"], meta.get("namespace") or self.namespace
        deadline = clock() + timeout
        last, false_since = "", None
        while True:
            obj = self.get(resource, name, namespace)
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

    def status(self, name: str, *, kserve: bool = False, namespace: str | None = None) -> ServiceStatus:
        """Readiness, URL, latest revision and scale of a Knative Service (or, with ``kserve``, InferenceService)."""
        resource = INFERENCE_SERVICE if kserve else SERVICE
        self.require(resource)
        namespace = namespace or self.namespace
        obj = self.get(resource, name, namespace)
        status = obj.get("status") or {}
        if kserve:
            predictor = (status.get("components") or {}).get("predictor") or {}
            created, ready_rev = predictor.get("latestCreatedRevision"), predictor.get("latestReadyRevision")
            spec = (obj.get("spec") or {}).get("predictor") or {}
            low, high = spec.get("minReplicas"), spec.get("maxReplicas")
            bounds = (None if low is None else str(low), None if high is None else str(high))
        else:
            created, ready_rev = status.get("latestCreatedRevisionName"), status.get("latestReadyRevisionName")
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
                revision = self.get(REVISION, revision_name, namespace)
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
            url=status.get("url"),
            latest_created=created,
            latest_ready=ready_rev,
            actual_replicas=actual,
            desired_replicas=desired,
            min_scale=bounds[0],
            max_scale=bounds[1],
        )


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
            obj = cluster.wait_ready(obj, timeout=wait_for, on_progress=on_progress, poll=poll, false_grace=false_grace)
        result.append(obj)
    return result


def urls(objects: Sequence[Mapping[str, Any]]) -> Iterator[str]:
    """The status URLs among deployed objects."""
    for obj in objects:
        url = (obj.get("status") or {}).get("url")
        if url:
            yield str(url)


def _context_namespace(path: str, context: str | None) -> str | None:
    contexts, active = kubernetes.config.list_kube_config_contexts(config_file=path)  # type: ignore[no-untyped-call]
    chosen = next((c for c in contexts if c.get("name") == context), None) if context else active
    namespace = ((chosen or {}).get("context") or {}).get("namespace")
    return str(namespace) if namespace else None


def _pod_namespace() -> str | None:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace", encoding="utf-8") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def _api_error(what: str, exc: ApiException) -> DeployError:
    message = exc.reason or "error"
    try:
        body = json.loads(exc.body or "")
        message = body.get("message") or message
    except (ValueError, AttributeError):
        pass
    status = exc.status
    if status in (401, 403):
        return DeployError(f"{what}: the API server refused it ({status}): {message}; check the context's credentials "
                           "and RBAC (zeroserve needs get and patch on these resources)")
    if status == 422:
        return DeployError(f"{what}: the manifest was rejected: {message}")
    return DeployError(f"{what}: {status} {message}")
