"""A stub of the Kubernetes API on 127.0.0.1 for exactly the calls ``zeroserve.deploy`` makes.

Used by tests/deploy (fixture ``kube_stub`` in its conftest.py).

No cluster runs here, so these tests talk to this stub instead: discovery (``GET /apis/GROUP/VERSION``, and
``GET /api/v1`` for ServiceAccounts),
server-side apply (``PATCH`` with ``application/apply-patch+yaml``) and reads of Services, InferenceServices and
Revisions. It plays the controllers too: an applied Service turns Ready after a few reads, as Knative's would.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

KINDS = {  # plural -> (kind, namespaced)
    "services": ("Service", True),
    "revisions": ("Revision", True),
    "configurations": ("Configuration", True),
    "routes": ("Route", True),
    "inferenceservices": ("InferenceService", True),
    "servingruntimes": ("ServingRuntime", True),
    "clusterservingruntimes": ("ClusterServingRuntime", False),
    "serviceaccounts": ("ServiceAccount", True),
}
CORE = {"v1": ["serviceaccounts"]}  # served under /api/v1, not /apis/GROUP/VERSION
KNATIVE = {"serving.knative.dev/v1": ["services", "revisions", "configurations", "routes"]}
KSERVE = {
    "serving.kserve.io/v1beta1": ["inferenceservices"],
    "serving.kserve.io/v1alpha1": ["servingruntimes", "clusterservingruntimes"],
}
TOKEN = "stub-token"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass
class KubeStub:
    """The stub's state and knobs. ``groups`` are the API group versions it serves (its installed CRDs)."""

    groups: dict[str, list[str]] = field(default_factory=lambda: {**CORE, **KNATIVE, **KSERVE})
    reads_until_ready: int = 2  # reads of an applied Service/InferenceService before its controller makes it Ready
    final_ready: str = "True"  # or "False": the rollout fails
    final_message: str = ""
    forbid_patch: bool = False
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)  # object path -> object
    reads: dict[str, int] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    url: str = ""
    kubeconfig: Path = Path()
    lock: threading.Lock = field(default_factory=threading.Lock)

    def paths(self, method: str) -> list[str]:
        return [r.path for r in self.requests if r.method == method]

    # -- what the API server and the controllers do ----------------------------------------------------------

    def handle(self, req: Request) -> tuple[int, Any]:
        with self.lock:
            self.requests.append(req)
            if req.headers.get("authorization") != f"Bearer {TOKEN}":
                return 401, _status(401, "Unauthorized", "Unauthorized")
            parts = req.path.strip("/").split("/")
            if len(parts) >= 2 and parts[0] == "api":
                group_version, rest = parts[1], parts[2:]
            elif len(parts) >= 3 and parts[0] == "apis":
                group_version, rest = f"{parts[1]}/{parts[2]}", parts[3:]
            else:
                return 404, _status(404, "NotFound", "the server could not find the requested resource")
            served = self.groups.get(group_version)
            if served is None:
                return 404, _status(404, "NotFound", "the server could not find the requested resource")
            if not rest:
                if req.method != "GET":
                    return 405, _status(405, "MethodNotAllowed", "method not allowed")
                return 200, _resource_list(group_version, served)
            namespace = None
            if rest[0] == "namespaces" and len(rest) >= 3:
                namespace, rest = rest[1], rest[2:]
            if len(rest) != 2 or rest[0] not in served:
                return 404, _status(404, "NotFound", "the server could not find the requested resource")
            plural, name = rest
            if KINDS[plural][1] != (namespace is not None):
                return 404, _status(404, "NotFound", "the server could not find the requested resource")
            if req.method == "PATCH":
                return self._apply(req, group_version, plural, namespace, name)
            if req.method == "GET":
                return self._read(req.path, plural, name)
            return 405, _status(405, "MethodNotAllowed", "method not allowed")

    def _apply(self, req: Request, api: str, plural: str, namespace: str | None, name: str) -> tuple[int, Any]:
        if req.headers.get("content-type") != "application/apply-patch+yaml":
            return 415, _status(415, "UnsupportedMediaType", "the body of the request was in an unknown format")
        if not req.query.get("fieldManager"):
            return 400, _status(400, "BadRequest", "PatchOptions.meta.k8s.io is invalid: fieldManager: Required value")
        if self.forbid_patch:
            return 403, _status(403, "Forbidden", f'{plural}.{api.split("/")[0]} "{name}" is forbidden: User '
                                "\"someone\" cannot patch resource")
        body = req.body
        if body.get("apiVersion") != api or body.get("kind") != KINDS[plural][0]:
            return 400, _status(400, "BadRequest", "apiVersion/kind do not match the path")
        meta = body.get("metadata") or {}
        if meta.get("name") != name or meta.get("namespace") != namespace:
            return 400, _status(400, "BadRequest", "the name/namespace of the object does not match the path")
        old = self.objects.get(req.path)
        generation = 1 if old is None else old["metadata"]["generation"] + (old.get("spec") != body.get("spec"))
        obj = {**body, "metadata": {**meta, "generation": generation, "uid": f"uid-{name}"}}
        if old is not None and "status" in old:
            obj["status"] = old["status"]
        self.objects[req.path] = obj
        self.reads[req.path] = 0
        return (201 if old is None else 200), obj

    def _read(self, path: str, plural: str, name: str) -> tuple[int, Any]:
        obj = self.objects.get(path)
        if obj is None:
            return 404, _status(404, "NotFound", f'{plural} "{name}" not found')
        self.reads[path] = self.reads.get(path, 0) + 1
        if plural in ("services", "inferenceservices"):
            self._reconcile(path, obj, plural)
        return 200, obj

    def _reconcile(self, path: str, obj: dict[str, Any], plural: str) -> None:
        name, generation = obj["metadata"]["name"], obj["metadata"]["generation"]
        namespace = obj["metadata"]["namespace"]
        revision = f"{name}-predictor-00001" if plural == "inferenceservices" else f"{name}-00001"
        if self.reads[path] < self.reads_until_ready:
            ready = {"type": "Ready", "status": "Unknown", "reason": "RevisionMissing",
                     "message": f'Configuration "{name}" is waiting for a Revision to become ready.'}
            obj["status"] = {"observedGeneration": generation, "conditions": [ready]}
            return
        status = self.final_ready
        ready = {"type": "Ready", "status": status}
        if status != "True":
            ready |= {"reason": "RevisionFailed", "message": self.final_message}
        url = f"http://{name}.{namespace}.example.com"
        obj["status"] = {"observedGeneration": generation, "conditions": [ready], "url": url}
        if plural == "inferenceservices":
            obj["status"]["components"] = {
                "predictor": {"latestCreatedRevision": revision, "latestReadyRevision": revision}
            }
        else:
            obj["status"] |= {"latestCreatedRevisionName": revision, "latestReadyRevisionName": revision}
        self.objects[f"/apis/serving.knative.dev/v1/namespaces/{namespace}/revisions/{revision}"] = {
            "apiVersion": "serving.knative.dev/v1",
            "kind": "Revision",
            "metadata": {"name": revision, "namespace": namespace, "generation": 1},
            "status": {"actualReplicas": 1, "desiredReplicas": 1},
        }


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": {}, "code": code}


def _resource_list(group_version: str, plurals: list[str]) -> dict[str, Any]:
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": [
            {"name": p, "singularName": KINDS[p][0].lower(), "namespaced": KINDS[p][1], "kind": KINDS[p][0],
             "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]}
            for p in plurals
        ],
    }


def _handler(stub: KubeStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            headers = {k.lower(): v for k, v in self.headers.items()}
            code, payload = stub.handle(Request(self.command, parts.path, parse_qs(parts.query), headers, body))
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PATCH = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
            pass

    return Handler


def write_kubeconfig(path: Path, server: str, namespace: str = "models") -> Path:
    """A kubeconfig with a current context ``stub`` (namespace ``namespace``) and a second one, ``other``."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "stub", "cluster": {"server": server}}],
        "users": [{"name": "stub", "user": {"token": TOKEN}}],
        "contexts": [
            {"name": "stub", "context": {"cluster": "stub", "user": "stub", "namespace": namespace}},
            {"name": "other", "context": {"cluster": "stub", "user": "stub", "namespace": "elsewhere"}},
        ],
        "current-context": "stub",
    }
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def start(tmp_path: Path) -> tuple[KubeStub, Callable[[], None]]:
    """Start a stub with Knative and KServe installed and a kubeconfig pointing at it; returns it and a stopper."""
    stub = KubeStub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(stub))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    stub.url = f"http://127.0.0.1:{server.server_address[1]}"
    stub.kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", stub.url)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stub, stop
