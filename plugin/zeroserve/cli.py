"""The ``zeroserve`` command.

``serve`` hands its arguments to the runtime, imported only then. ``render`` prints Knative or KServe manifests
(or writes the whole Kustomize tree); ``deploy`` applies them to the current Kubernetes context and waits until
they are Ready; ``status`` reports on a deployed service. Each command imports what it needs when it runs, so
``import zeroserve.cli`` stays light.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zeroserve.deploy import Cluster
    from zeroserve.render_options import RenderOptions

USAGE = """usage: zeroserve <command> [options]

commands:
  serve     serve ONNX models over the Open Inference Protocol (KServe V2); see `zeroserve serve --help`
  dev       serve with scale to zero on this machine: a server process starts on the first request, stops
            when idle (Knative's activator in miniature); see `zeroserve dev --help`
  render    print Knative or KServe manifests for a model, or write the kustomize tree (--out-dir)
  deploy    apply them to the current Kubernetes context and wait until the service is ready
  status    show a deployed service: readiness, URL, latest revision and scale

  --version print the installed version
"""
DEPLOY_EXTRA = "pip install 'zeroserve[deploy]'"
SERVER_EXTRAS = "pip install 'zeroserve[runtime,cpu]' ('zeroserve[runtime,gpu]' for ONNX Runtime's GPU build)"
# What `serve` and `dev` run on: the runtime extra's imports and an ONNX Runtime build (extra cpu or gpu). Checked
# by name before anything is imported, since the server imports some of them only when it starts serving.
SERVER_MODULES = ("starlette", "uvicorn", "numpy", "orjson", "onnxruntime")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from zeroserve._version import version

        print(f"zeroserve {version()}")
        return 0
    command, rest = args[0], args[1:]
    if command in ("serve", "dev"):
        return _serve(command, rest)
    handler = _COMMANDS.get(command)
    if handler is None:
        print(f"zeroserve: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
        return 2
    return handler(rest)


def _serve(command: str, args: list[str]) -> int:
    missing = [] if {"-h", "--help"} & set(args) else _missing_server_modules()
    if missing:
        print(f"zeroserve {command} needs the server extras ({', '.join(missing)} missing): {SERVER_EXTRAS}",
              file=sys.stderr)
        return 2
    try:
        if command == "dev":
            from zeroserve.activator.dev import main as run
        else:
            from zeroserve.runtime.__main__ import main as run
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] in SERVER_MODULES:
            print(f"zeroserve {command} needs the server extras ({exc.name} missing): {SERVER_EXTRAS}", file=sys.stderr)
            return 2
        raise
    return run(args)


def _missing_server_modules() -> list[str]:
    from importlib.util import find_spec

    return [name for name in SERVER_MODULES if find_spec(name) is None]


# ---------------------------------------------------------------------------------------------------------
# render


def _add_render_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults live in RenderOptions only: an option left out here keeps its dataclass default.
    group = parser.add_argument_group("what to render (defaults as in the repository's knative/ folder)")
    add = group.add_argument
    add("--name", help="Knative Service / InferenceService name (default mlp)")
    add("--model-name", dest="model_name", help="name the model is served under (default: --name)")
    add("--model-uri", dest="model_uri", help="where the server fetches the model: s3://, gs://, https://, ...")
    add("--image", help="runtime image (default dev.local/zeroserve:VERSION, with -gpu for --gpu)")
    add("--gpu", dest="accelerator", action="store_const", const="gpu", help="GPU image and an nvidia.com/gpu limit")
    add("--grpc", dest="protocol", action="store_const", const="grpc", help="expose gRPC on the h2c port")
    add("--kserve", action="store_true", help="a KServe ClusterServingRuntime and InferenceService instead")
    add("--namespace", "-n", help="namespace (default: the one of the kubeconfig context)")
    add("--min-scale", dest="min_scale", type=int, help="minimum pods; 0 scales to zero (default 0)")
    add("--max-scale", dest="max_scale", type=int, help="maximum pods; 0 is unbounded (default 4)")
    add("--target-concurrency", dest="target_concurrency", type=int, help="in-flight requests per pod (default 4)")
    add("--container-concurrency", dest="container_concurrency", type=int,
        help="hard cap of in-flight requests per pod; 0 is unlimited (default 8)")
    add("--cold-start", dest="cold_start", type=int, metavar="SECONDS",
        help="expected cold start; sizes the startup probe, progress deadline and timeouts (default 60, GPU 300)")
    add("--no-startup-probe", dest="startup_probe", action="store_false", default=None,
        help="no kubelet startup probe: slightly faster cold starts, no restart of a container stuck loading")
    pod = parser.add_argument_group("credentials, identity, sizes and placement")
    add = pod.add_argument
    add("--s3-secret", dest="s3_secret", metavar="SECRET",
        help="Secret with the keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY: env of the server on Knative; "
        "with --kserve, a ServiceAccount listing it for KServe's storage initializer")
    add("--s3-endpoint", dest="s3_endpoint", metavar="URL", help="S3-compatible endpoint (MinIO: http://minio:9000)")
    add("--s3-region", dest="s3_region", metavar="REGION", help="the bucket's region (AWS_DEFAULT_REGION)")
    add("--service-account", dest="service_account", metavar="NAME",
        help="the pod's ServiceAccount (cloud identity: IRSA, Workload Identity)")
    add("--image-pull-secret", dest="image_pull_secrets", action="append", metavar="SECRET",
        help="registry credentials for the image (repeatable)")
    add("--env", action="append", metavar="NAME=VALUE", help="an environment variable of the server (repeatable)")
    add("--env-from-secret", dest="env_from_secrets", action="append", metavar="SECRET",
        help="every key of this Secret becomes an environment variable (repeatable)")
    add("--requests", metavar="cpu=1,memory=1Gi", help="resource requests, replacing the defaults key by key")
    add("--limits", metavar="cpu=2,memory=2Gi", help="resource limits, replacing the defaults key by key")
    add("--node-selector", dest="node_selector", action="append", metavar="KEY=VALUE",
        help="a node label the pod needs (repeatable; Knative flag kubernetes.podspec-nodeselector)")
    add("--toleration", dest="tolerations", action="append", metavar="KEY[=VALUE][:EFFECT]",
        help="a node taint the pod tolerates (repeatable; Knative flag kubernetes.podspec-tolerations)")
    add("--otel-endpoint", dest="otel_endpoint", metavar="URL",
        help="OTLP/HTTP collector for traces and metrics (sets OTEL_*; service.name is Knative's K_SERVICE)")


_OPTION_FIELDS = (
    "name", "model_name", "model_uri", "image", "accelerator", "protocol", "namespace", "min_scale", "max_scale",
    "target_concurrency", "container_concurrency", "cold_start", "startup_probe", "service_account",
    "image_pull_secrets", "s3_secret", "s3_endpoint", "s3_region", "env", "env_from_secrets", "requests", "limits",
    "node_selector", "tolerations", "otel_endpoint",
)


def _given_options(ns: argparse.Namespace) -> dict[str, Any]:
    """The render options given on the command line; raises ValueError for a malformed one."""
    from zeroserve.render_options import Toleration, parse_pairs

    given = {field: getattr(ns, field) for field in _OPTION_FIELDS if getattr(ns, field, None) is not None}
    for field in ("image_pull_secrets", "env_from_secrets"):
        if field in given:
            given[field] = tuple(given[field])
    for field in ("env", "node_selector"):
        if field in given:  # one NAME=VALUE per flag, so a value may hold commas
            given[field] = tuple(_pair(item, _flag(field)) for item in given[field])
    for field in ("requests", "limits"):
        if field in given:
            given[field] = parse_pairs(given[field], _flag(field))
    if "tolerations" in given:
        given["tolerations"] = tuple(Toleration.parse(text) for text in given["tolerations"])
    return given


def _pair(item: str, flag: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"{flag} takes NAME=VALUE, got {item!r}")
    return key, value


def _render_options(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> RenderOptions:
    from zeroserve.render_options import RenderOptions

    try:
        return RenderOptions(**_given_options(ns))
    except ValueError as exc:
        parser.error(_flag_names(str(exc)))


_FLAGS = {"image_pull_secrets": "--image-pull-secret", "env_from_secrets": "--env-from-secret",
          "tolerations": "--toleration"}


def _flag(field: str) -> str:
    return _FLAGS.get(field, "--" + field.replace("_", "-"))


def _flag_names(message: str) -> str:
    # The messages name the dataclass fields; say the flags instead.
    named = [f for f in _OPTION_FIELDS if "_" in f or f in ("env", "requests", "limits")]
    fields = re.compile(r"(?<![-\w])(" + "|".join(named) + r")\b")
    return fields.sub(lambda m: _flag(m[1]), message)


def _render(args: list[str]) -> int:
    from zeroserve import render as rendering

    parser = argparse.ArgumentParser(
        prog="zeroserve render",
        description="Print Knative Serving or KServe manifests for the zeroserve image (kubectl apply -f - takes "
        "them), or write the whole kustomize tree the repository's knative/ folder holds.",
    )
    _add_render_arguments(parser)
    parser.add_argument("--out-dir", type=Path, metavar="DIR", help="write the kustomize tree (every variant) here")
    parser.add_argument("--check", action="store_true", help="with --out-dir: compare, write nothing, exit 1 on drift")
    ns = parser.parse_args(args)
    options = _render_options(parser, ns)
    if ns.check and ns.out_dir is None:
        parser.error("--check needs --out-dir")
    if ns.out_dir is None:
        target: rendering.Target = "kserve" if ns.kserve else "knative"
        manifests = _rendered(parser, options, target)
        for note in rendering.notes(options, target):
            print(f"zeroserve render: warning: {note}", file=sys.stderr)
        comment = rendering.explain(options, target)
        print(rendering.to_yaml(manifests, comments=[comment] * len(manifests)), end="")
        return 0
    clashing = [flag for flag, given in (("--gpu", ns.accelerator), ("--grpc", ns.protocol), ("--kserve", ns.kserve),
                                         ("--image", ns.image)) if given]
    if clashing:
        parser.error(f"--out-dir writes every variant with its own image; drop {', '.join(clashing)}")
    try:
        files = rendering.layout(options)
    except ValueError as exc:
        parser.error(_flag_names(str(exc)))
    if ns.check:
        drift = [path for path, text in files.items() if _read(ns.out_dir / path) != text]
        extra = sorted(str(p.relative_to(ns.out_dir)) for p in ns.out_dir.rglob("*.yaml"))
        for path in drift:
            print(f"zeroserve render: {ns.out_dir / path} differs from `zeroserve render --out-dir`", file=sys.stderr)
        for path in (p for p in extra if p not in files):
            drift.append(path)
            print(f"zeroserve render: {ns.out_dir / path} is not part of the rendered tree", file=sys.stderr)
        return 1 if drift else 0
    for path, text in files.items():
        target_path = ns.out_dir / path
        target_path.parent.mkdir(parents=True, exist_ok=True)
        target_path.write_text(text, encoding="utf-8")
        print(f"wrote {target_path}", file=sys.stderr)
    return 0


def _rendered(parser: argparse.ArgumentParser, options: RenderOptions, target: str) -> list[dict[str, Any]]:
    from zeroserve import render as rendering

    try:
        return rendering.render(options, "kserve" if target == "kserve" else "knative")
    except ValueError as exc:
        parser.error(_flag_names(str(exc)))


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------------------
# deploy and status


def _add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cluster (as kubectl: KUBECONFIG or ~/.kube/config, its current context)")
    group.add_argument("--kubeconfig", help="kubeconfig file (default $KUBECONFIG, then ~/.kube/config)")
    group.add_argument("--context", help="kubeconfig context (default: the current one)")


def _connect(ns: argparse.Namespace) -> Cluster:
    import os

    from zeroserve.deploy import Cluster

    return Cluster.connect(kubeconfig=ns.kubeconfig, context=ns.context, namespace=ns.namespace, environ=os.environ)


def _load_deploy(command: str) -> bool:
    try:
        import zeroserve.deploy  # noqa: F401
    except ImportError as exc:
        if (exc.name or "").split(".")[0] in ("kubernetes", "urllib3", "yaml"):
            print(f"zeroserve {command} needs the Kubernetes client: {DEPLOY_EXTRA}", file=sys.stderr)
            return False
        raise
    return True


def _deploy(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="zeroserve deploy",
        description="Apply a Knative Service (or a KServe runtime and InferenceService) to the current Kubernetes "
        "context with server-side apply, wait until it is Ready and print its URL. The manifests are rendered "
        "from the options below, or read from -f files.",
    )
    parser.add_argument("-f", "--filename", dest="files", action="append", metavar="FILE",
                        help="apply these manifests instead of rendering them ('-' reads stdin; repeatable)")
    _add_render_arguments(parser)
    _add_cluster_arguments(parser)
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="how long to wait for Ready (default: the progress deadline plus a minute)")
    parser.add_argument("--no-wait", dest="wait", action="store_false", help="apply and return")
    ns = parser.parse_args(args)
    rendered = {k: v for k, v in _given_options(ns).items() if k != "namespace"}
    if ns.files and (rendered or ns.kserve):
        parser.error("give either -f files or render options, not both")
    if ns.files:
        manifests = _read_manifests(parser, ns.files)
    else:
        from zeroserve import render as rendering

        options = _render_options(parser, ns)
        target = "kserve" if ns.kserve else "knative"
        manifests = _rendered(parser, options, target)
        for note in rendering.notes(options, "kserve" if ns.kserve else "knative"):
            print(f"zeroserve deploy: warning: {note}", file=sys.stderr)
    if not _load_deploy("deploy"):
        return 2
    from zeroserve.deploy import DeployError, deploy, urls

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        cluster = _connect(ns)
        objects = deploy(cluster, manifests, wait=ns.wait, timeout=ns.timeout, on_progress=progress)
    except DeployError as exc:
        print(f"zeroserve deploy: {exc}", file=sys.stderr)
        return 1
    for url in urls(objects):
        print(url)
    return 0


def _read_manifests(parser: argparse.ArgumentParser, files: Sequence[str]) -> list[dict[str, Any]]:
    try:
        import yaml
    except ImportError:
        parser.error(f"-f needs PyYAML: {DEPLOY_EXTRA}")
    manifests = []
    for name in files:
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
            docs = list(yaml.safe_load_all(text))
        except (OSError, yaml.YAMLError) as exc:
            parser.error(f"cannot read {name}: {exc}")
        manifests += [doc for doc in docs if doc is not None]
    if not manifests:
        parser.error("no manifests in the files given")
    bad = [m for m in manifests if not isinstance(m, dict) or "kind" not in m]
    if bad:
        parser.error("every YAML document must be a Kubernetes object with apiVersion and kind")
    return manifests


def _status(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="zeroserve status",
        description="Show a Knative Service (or, with --kserve, an InferenceService): readiness, URL, latest "
        "revision and how many pods it runs.",
    )
    parser.add_argument("name", help="the Knative Service or InferenceService")
    parser.add_argument("--kserve", action="store_true", help="NAME is a KServe InferenceService")
    parser.add_argument("--namespace", "-n", help="namespace (default: the one of the kubeconfig context)")
    _add_cluster_arguments(parser)
    ns = parser.parse_args(args)
    if not _load_deploy("status"):
        return 2
    from zeroserve.deploy import DeployError
    from zeroserve.deploy import status as read_status

    try:
        status = read_status(_connect(ns), ns.name, kserve=ns.kserve)
    except DeployError as exc:
        print(f"zeroserve status: {exc}", file=sys.stderr)
        return 1
    print("\n".join(status.lines()))
    return 0 if status.ready.status == "True" else 1


_COMMANDS: dict[str, Callable[[list[str]], int]] = {"render": _render, "deploy": _deploy, "status": _status}
