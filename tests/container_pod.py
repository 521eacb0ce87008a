"""A container started by a real Docker engine the way a rendered pod spec says: what kubelet, Knative and KServe
would do with it, done with ``docker run``.

Used by tests/test_container.py and bench/image.py. From the pod spec and its container it takes the args, the
environment (literal values, ``secretKeyRef`` and ``envFrom`` resolved against the Secrets given, as kubelet
does), the ``securityContext`` (read-only root filesystem, dropped capabilities, no privilege escalation, and
kubelet's ``runAsNonRoot`` check that the image's user is numeric and not 0), the CPU and memory limits, the
``emptyDir`` volumes (as tmpfs mounts, mode 0777 like an emptyDir) and the termination grace period. Knative's
part: ``PORT`` set to the container port, ``K_SERVICE``/``K_CONFIGURATION``/``K_REVISION``. KServe's part: the
runtime's ``{{.Name}}`` filled in, the InferenceService's args appended, and the model at ``/mnt/models``,
read-only.

One change is forced by the machine: the container shares the host's network (``--network host``, so all traffic
stays on loopback), so each container port is mapped to a free loopback port, in the args (``--http_port=N``),
in ``PORT`` and in the probes. Nothing else differs from the manifest.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from zeroserve.render_options import quantity

DOCKER = os.environ.get("DOCKER", "docker")
Manifest = dict[str, Any]


class PodError(RuntimeError):
    """Kubelet would refuse to start this container (a missing Secret key, a root image under runAsNonRoot)."""


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one docker command, bounded; a failure raises with docker's own message."""
    result = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])} ... failed ({result.returncode}): {result.stderr.strip()}")
    return result


def engine_problem() -> str | None:
    """Why no Docker engine can be used here, or None when one answers."""
    try:
        result = subprocess.run([DOCKER, "version", "--format", "{{.Server.Version}}"], capture_output=True,
                                text=True, timeout=20)
    except FileNotFoundError:
        return f"no {DOCKER} command on PATH"
    except subprocess.TimeoutExpired:
        return f"{DOCKER} version did not answer in 20 s"
    if result.returncode != 0:
        return f"{DOCKER} version failed: {result.stderr.strip() or result.stdout.strip()}"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class PodSpec:
    """One container of a pod, with the pod fields that matter to how it runs."""

    container: Manifest
    volumes: list[Manifest]
    grace_seconds: int
    security: Manifest = field(default_factory=dict)  # the pod-level securityContext

    @classmethod
    def of_knative_service(cls, service: Mapping[str, Any]) -> PodSpec:
        spec = service["spec"]["template"]["spec"]
        [container] = spec["containers"]
        # Knative gives the pod a termination grace period of the revision's timeoutSeconds.
        return cls(container, spec.get("volumes", []), int(spec.get("timeoutSeconds", 300)),
                   spec.get("securityContext", {}))

    @classmethod
    def of_inference_service(cls, runtime: Mapping[str, Any], isvc: Mapping[str, Any]) -> PodSpec:
        """The runtime's container as KServe merges an InferenceService's model into it."""
        [container] = json.loads(json.dumps(runtime["spec"]["containers"]))
        meta = isvc["metadata"]
        fields = {"Name": meta["name"], "Namespace": meta.get("namespace", "default")}
        container["args"] = [re.sub(r"\{\{\.(\w+)\}\}", lambda m: fields[m[1]], arg) for arg in container["args"]]
        predictor = isvc["spec"]["predictor"]
        model = predictor["model"]
        container["args"] += model.get("args", [])
        container["env"] = container.get("env", []) + model.get("env", [])
        container["envFrom"] = container.get("envFrom", []) + model.get("envFrom", [])
        for key in ("ports", "resources"):
            if key in model:
                container[key] = model[key]
        return cls(container, runtime["spec"].get("volumes", []), int(predictor.get("timeout", 300)))


@dataclass
class Container:
    """A started container and the loopback ports its container ports were mapped to."""

    id: str
    name: str
    ports: dict[int, int]
    grace_seconds: int
    started_at: float  # time.monotonic() just before `docker run`

    def logs(self) -> str:
        result = docker("logs", self.id, check=False)
        return result.stdout + result.stderr

    def state(self) -> Manifest:
        state: Manifest = json.loads(docker("inspect", "--format", "{{json .State}}", self.id).stdout)
        return state

    def host_port(self, container_port: int) -> int:
        return self.ports[container_port]

    def wait(self, check: Callable[[], bool], what: str, timeout: float) -> float:
        """Poll ``check`` every 50 ms (as queue-proxy probes) until it holds; seconds since ``docker run``.

        Fails, with the container's log, when the container exits or ``timeout`` passes first.
        """
        deadline = time.monotonic() + timeout
        polls = 0
        while True:
            if check():
                return time.monotonic() - self.started_at
            polls += 1
            if polls % 10 == 0 and not self.state()["Running"]:
                raise RuntimeError(f"container {self.name} exited ({self.state()['ExitCode']}) before {what}:\n"
                                   f"{self.logs()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"container {self.name}: no {what} after {timeout:.0f} s:\n{self.logs()}")
            time.sleep(0.05)

    def wait_http(self, path: str, container_port: int, timeout: float) -> float:
        url = f"http://127.0.0.1:{self.host_port(container_port)}{path}"

        def answered() -> bool:
            try:
                return httpx.get(url, timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        return self.wait(answered, f"200 from {path}", timeout)

    def stop(self) -> tuple[int, float]:
        """``docker stop`` with the pod's grace period (SIGTERM, then SIGKILL); the exit code and seconds taken."""
        start = time.monotonic()
        docker("stop", "--time", str(self.grace_seconds), self.id, timeout=self.grace_seconds + 30)
        seconds = time.monotonic() - start
        return int(self.state()["ExitCode"]), seconds

    def remove(self) -> None:
        docker("rm", "--force", self.id, check=False)


def run(
    image: str,
    pod: PodSpec,
    *,
    name: str,
    secrets: Mapping[str, Mapping[str, str]] = {},
    binds: Mapping[str, str] = {},
    knative_service: str | None = None,
) -> Container:
    """Start ``pod``'s container from ``image`` as kubelet would; ``binds`` maps host folders to read-only mounts.

    ``knative_service`` names the Knative Service whose revision this is (sets PORT and the K_* variables).
    """
    container = pod.container
    _check_non_root(image, container.get("securityContext", {}), pod.security)
    ports = {int(p["containerPort"]): free_port() for p in container.get("ports", [])}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        for handler in ("httpGet", "tcpSocket", "grpc"):
            port = container.get(probe, {}).get(handler, {}).get("port")
            if isinstance(port, int) and port not in ports:
                ports[port] = free_port()
    args = [_mapped(arg, ports) for arg in container.get("args", [])]
    env = dict(_environment(container, secrets))
    if knative_service is not None:
        # Knative sets PORT to the one declared container port, and names the service, configuration, revision.
        [port] = [int(p["containerPort"]) for p in container["ports"]]
        env |= {"PORT": str(ports[port]), "K_SERVICE": knative_service, "K_CONFIGURATION": knative_service,
                "K_REVISION": f"{knative_service}-00001"}
    argv = ["run", "--detach", "--name", name, "--network", "host", *_security(container), *_limits(container)]
    argv += [opt for volume in _mounts(container, pod.volumes, binds) for opt in volume]
    argv += [opt for key, value in env.items() for opt in ("--env", f"{key}={value}")]
    if container.get("command"):
        argv += ["--entrypoint", container["command"][0]]
    argv += [image, *container.get("command", [])[1:], *args]
    started = time.monotonic()
    container_id = docker(*argv).stdout.strip()
    return Container(container_id, name, ports, pod.grace_seconds, started)


def _mapped(arg: str, ports: Mapping[int, int]) -> str:
    match = re.fullmatch(r"(--\w+_port=)(\d+)", arg)
    if match and int(match[2]) in ports:
        return f"{match[1]}{ports[int(match[2])]}"
    return arg


def _environment(container: Mapping[str, Any], secrets: Mapping[str, Mapping[str, str]]) -> Iterator[tuple[str, str]]:
    # envFrom first, then env, which wins on a clash (kubelet's order).
    for source in container.get("envFrom", []):
        name = source["secretRef"]["name"]
        if name not in secrets:
            raise PodError(f"CreateContainerConfigError: secret {name!r} not found")
        yield from secrets[name].items()
    for item in container.get("env", []):
        if "value" in item:
            yield item["name"], item["value"]
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        value = secrets.get(ref["name"], {}).get(ref["key"])
        if value is None:
            raise PodError(f"CreateContainerConfigError: key {ref['key']!r} of secret {ref['name']!r} not found")
        yield item["name"], value


def _check_non_root(image: str, security: Mapping[str, Any], pod_security: Mapping[str, Any]) -> None:
    if not (security.get("runAsNonRoot") or pod_security.get("runAsNonRoot")):
        return
    user = security.get("runAsUser", pod_security.get("runAsUser"))
    if user is None:
        user = docker("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip().split(":")[0]
    if not str(user).isdigit():
        raise PodError(f"image {image} has non-numeric user ({user!r}), cannot verify user is non-root")
    if int(user) == 0:
        raise PodError(f"image {image} runs as root and runAsNonRoot is set")


def _security(container: Mapping[str, Any]) -> list[str]:
    context = container.get("securityContext", {})
    found = []
    if context.get("readOnlyRootFilesystem"):
        found.append("--read-only")
    for capability in context.get("capabilities", {}).get("drop", []):
        found += ["--cap-drop", capability]
    for capability in context.get("capabilities", {}).get("add", []):
        found += ["--cap-add", capability]
    if context.get("allowPrivilegeEscalation") is False:
        found += ["--security-opt", "no-new-privileges"]
    if context.get("seccompProfile", {}).get("type") not in (None, "RuntimeDefault"):
        raise PodError(f"seccompProfile {context['seccompProfile']} is not what these tests emulate")
    if "runAsUser" in context:
        found += ["--user", str(context["runAsUser"])]
    return found


def _limits(container: Mapping[str, Any]) -> list[str]:
    limits = container.get("resources", {}).get("limits", {})
    found = []
    if "cpu" in limits:
        found += ["--cpus", str(quantity(limits["cpu"]))]
    if "memory" in limits:
        found += ["--memory", str(int(quantity(limits["memory"])))]
    return found


def _mounts(container: Mapping[str, Any], volumes: Sequence[Mapping[str, Any]],
            binds: Mapping[str, str]) -> Iterator[list[str]]:
    kinds = {v["name"]: v for v in volumes}
    for mount in container.get("volumeMounts", []):
        volume = kinds[mount["name"]]
        if "emptyDir" not in volume:
            raise PodError(f"volume {mount['name']} is not an emptyDir, which is all these tests emulate")
        yield ["--mount", f"type=tmpfs,destination={mount['mountPath']},tmpfs-mode=0777"]
    for host, target in binds.items():
        yield ["--mount", f"type=bind,source={host},destination={target},readonly"]
