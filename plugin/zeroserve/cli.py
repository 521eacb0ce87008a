"""The ``zeroserve`` command.

``serve`` hands its arguments to the runtime, imported only then. ``render`` (``zeroserve.render_command``) prints
Knative, KServe or Eventing manifests (or writes the whole Kustomize tree); ``deploy`` applies them to the current
Kubernetes context and waits until they are Ready; ``status`` reports on a deployed service. Each command imports
what it needs when it runs, so ``import zeroserve.cli`` stays light.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zeroserve.deploy import Cluster

USAGE = """usage: zeroserve <command> [options]

commands:
  serve     serve ONNX models over the Open Inference Protocol (KServe V2); see `zeroserve serve --help`
  dev       serve with scale to zero on this machine: a server process starts on the first request, stops
            when idle (Knative's activator in miniature); see `zeroserve dev --help`
  render    print Knative, KServe (--kserve) or Eventing (--eventing) manifests for a model, or write the
            kustomize tree (--out-dir)
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
            from zeroserve.runtime.__main__ import exit_now
            from zeroserve.runtime.__main__ import main as run
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] in SERVER_MODULES:
            print(f"zeroserve {command} needs the server extras ({exc.name} missing): {SERVER_EXTRAS}", file=sys.stderr)
            return 2
        raise
    if command == "dev":
        return run(args)
    exit_now(run(args))  # as `python -m zeroserve.runtime` ends: see exit_now


def _missing_server_modules() -> list[str]:
    from importlib.util import find_spec

    return [name for name in SERVER_MODULES if find_spec(name) is None]


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
    from zeroserve import render_command

    parser.add_argument("-f", "--filename", dest="files", action="append", metavar="FILE",
                        help="apply these manifests instead of rendering them ('-' reads stdin; repeatable)")
    render_command.add_render_arguments(parser)
    _add_cluster_arguments(parser)
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="how long to wait for Ready (default: the progress deadline plus a minute)")
    parser.add_argument("--no-wait", dest="wait", action="store_false", help="apply and return")
    ns = parser.parse_args(args)
    try:
        given = {k: v for k, v in render_command.given_options(ns).items() if k != "namespace"}
    except ValueError as exc:
        parser.error(str(exc))
    if ns.files and (given or ns.kserve):
        parser.error("give either -f files or render options, not both")
    if ns.files:
        manifests = _read_manifests(parser, ns.files)
    else:
        from zeroserve import render as rendering

        options = render_command.render_options(parser, ns)
        target: rendering.Target = "kserve" if ns.kserve else "knative"
        manifests = render_command.rendered(parser, options, target)
        for note in rendering.notes(options, target):
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


def _render(args: list[str]) -> int:
    from zeroserve import render_command

    return render_command.main(args)


_COMMANDS: dict[str, Callable[[list[str]], int]] = {"render": _render, "deploy": _deploy, "status": _status}
