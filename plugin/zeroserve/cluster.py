"""One Kubernetes API server, reached the way kubectl reaches it, and the few calls ``zeroserve deploy`` and
``zeroserve status`` make to it.

Uses the official ``kubernetes`` client (extra ``deploy``) with the kubeconfig and context kubectl would use
(``KUBECONFIG`` or ``~/.kube/config``; the pod's service account when neither exists inside a cluster), and
server-side apply, so re-deploying changed options updates the fields zeroserve owns. The only calls made:

    GET    /apis/GROUP/VERSION (/api/v1)                          is Knative Serving / KServe installed?
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
from collections.abc import Callable, Mapping
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

__all__ = ["Cluster", "DeployError", "MissingAPIError", "NoClusterError", "NotFoundError", "NotReadyError",
           "ReadyTimeout", "Resource", "resource_of"]

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
    """Where a kind lives in the API; ``group`` is empty for the core group (``/api/v1``)."""

    group: str
    version: str
    plural: str
    namespaced: bool
    installs: str  # what to install when the group is missing

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


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
    # KServe's storage initializer takes S3 credentials from the Secrets its ServiceAccount lists.
    ("v1", "ServiceAccount"): Resource("", "v1", "serviceaccounts", True, "Kubernetes"),
}


def resource_of(manifest: Mapping[str, Any]) -> Resource:
    """The API resource of a manifest; raises DeployError for kinds zeroserve does not apply."""
    key = (str(manifest.get("apiVersion")), str(manifest.get("kind")))
    found = RESOURCES.get(key)
    if found is None:
        kinds = ", ".join(f"{kind} ({api})" for api, kind in RESOURCES)
        raise DeployError(f"zeroserve deploy applies {kinds}; use kubectl apply for {key[1]} ({key[0]})")
    return found


class Cluster:
    """The API server of one kubeconfig context, and the namespace used when a manifest names none."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        self.api = kubernetes.client.CustomObjectsApi(api_client)
        self.core = kubernetes.client.CoreV1Api(api_client)
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
            what = f"discovering {resource.api_version}"
            if resource.group:
                found = self._call(what, self.api.get_api_resources, resource.group, resource.version, missing_ok=True)
            else:
                found = self._call(what, self.core.get_api_resources, missing_ok=True)
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
        args: tuple[str, ...]
        if not resource.group:  # the only core kind here: ServiceAccount
            namespace = body["metadata"].setdefault("namespace", self.namespace)
            patch, args = self.core.patch_namespaced_service_account, (name, namespace)
        elif resource.namespaced:
            namespace = body["metadata"].setdefault("namespace", self.namespace)
            patch = self.api.patch_namespaced_custom_object
            args = (resource.group, resource.version, namespace, resource.plural, name)
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
        """Read one namespaced custom object; raises NotFoundError when it does not exist."""
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
