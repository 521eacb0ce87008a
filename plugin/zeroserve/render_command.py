"""``zeroserve render``: its options (shared with ``zeroserve deploy``), turned into ``RenderOptions`` and
``EventingOptions`` with the messages naming the flags, and the command itself: print one variant, or write or
check the whole Kustomize tree. Imports nothing heavy, like the rest of the command line.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zeroserve.render_options import RenderOptions

__all__ = ["add_render_arguments", "given_options", "main", "render_options", "rendered"]


def add_render_arguments(parser: argparse.ArgumentParser) -> None:
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
    many = parser.add_argument_group("many models in one service (--model-uri is then the repository)")
    add = many.add_argument
    add("--model-loading", dest="model_loading", choices=("eager", "on_demand", "explicit"),
        help="eager (default): load the model at start; on_demand: index the repository (NAME/VERSION/model.onnx "
        "or NAME/model.onnx) and load a model on its first request; explicit: load through the repository API only")
    add("--max-loaded-models", dest="max_loaded_models", type=int, metavar="N",
        help="models loaded at once (default 0: no bound)")
    add("--max-loaded-mib", dest="max_loaded_mib", type=int, metavar="MIB",
        help="the loaded models' estimated memory; sizes the memory request and limit unless --requests/--limits "
        "give memory (default 0: no bound)")
    add("--model-idle-timeout", dest="model_idle_timeout", type=int, metavar="SECONDS",
        help="unload a model idle this long (default 0: never)")
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
    "name", "model_name", "model_uri", "model_loading", "max_loaded_models", "max_loaded_mib", "model_idle_timeout",
    "image", "accelerator", "protocol", "namespace", "min_scale", "max_scale",
    "target_concurrency", "container_concurrency", "cold_start", "startup_probe", "service_account",
    "image_pull_secrets", "s3_secret", "s3_endpoint", "s3_region", "env", "env_from_secrets", "requests", "limits",
    "node_selector", "tolerations", "otel_endpoint",
)


def given_options(ns: argparse.Namespace) -> dict[str, Any]:
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


def render_options(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> RenderOptions:
    from zeroserve.render_options import RenderOptions

    try:
        return RenderOptions(**given_options(ns))
    except ValueError as exc:
        parser.error(_flag_names(str(exc)))


_LOADING_FIELDS = ("model_loading", "max_loaded_models", "max_loaded_mib", "model_idle_timeout")
_FLAGS = {"image_pull_secrets": "--image-pull-secret", "env_from_secrets": "--env-from-secret",
          "tolerations": "--toleration"}


def _flag(field: str) -> str:
    return _FLAGS.get(field, "--" + field.replace("_", "-"))


def _flag_names(message: str) -> str:
    # The messages name the dataclass fields; say the flags instead.
    named = [f for f in _OPTION_FIELDS if "_" in f or f in ("env", "requests", "limits")]
    fields = re.compile(r"(?<![-\w])(" + "|".join(named) + r")\b")
    return fields.sub(lambda m: _flag(m[1]), message)


def main(args: list[str]) -> int:
    from zeroserve import render as rendering

    parser = argparse.ArgumentParser(
        prog="zeroserve render",
        description="Print Knative Serving or KServe manifests for the zeroserve image (kubectl apply -f - takes "
        "them), or write the whole kustomize tree the repository's knative/ folder holds.",
    )
    add_render_arguments(parser)
    _add_eventing_arguments(parser)
    parser.add_argument("--out-dir", type=Path, metavar="DIR", help="write the kustomize tree (every variant) here")
    parser.add_argument("--check", action="store_true", help="with --out-dir: compare, write nothing, exit 1 on drift")
    ns = parser.parse_args(args)
    if ns.check and ns.out_dir is None:
        parser.error("--check needs --out-dir")
    if ns.out_dir is not None:
        given = (("--gpu", ns.accelerator), ("--grpc", ns.protocol), ("--kserve", ns.kserve), ("--image", ns.image),
                 ("--eventing", ns.eventing), *((_flag(field), getattr(ns, field)) for field in _LOADING_FIELDS))
        clashing = [flag for flag, value in given if value is not None and value is not False]
        if clashing:
            parser.error(f"--out-dir writes every variant with its own settings; drop {', '.join(clashing)}")
    options = render_options(parser, ns)
    events = _eventing_options(parser, ns)
    if ns.out_dir is None and ns.eventing:
        from zeroserve import eventing

        try:
            manifests = eventing.render(options, events, kserve=ns.kserve)
        except ValueError as exc:
            parser.error(_flag_names(str(exc)))
        print(rendering.to_yaml(manifests, comments=[eventing.explain(options, events, kserve=ns.kserve)]), end="")
        return 0
    if ns.out_dir is None:
        target: rendering.Target = "kserve" if ns.kserve else "knative"
        manifests = rendered(parser, options, target)
        for note in rendering.notes(options, target):
            print(f"zeroserve render: warning: {note}", file=sys.stderr)
        comment = rendering.explain(options, target)
        print(rendering.to_yaml(manifests, comments=[comment] * len(manifests)), end="")
        return 0
    try:
        files = rendering.layout(options, events)
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


def _add_eventing_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("events (--eventing: a Broker, Triggers and a PingSource for the model)")
    add = group.add_argument
    add("--eventing", action="store_true", help="print the Knative Eventing manifests that send events to the model")
    add("--broker", help="the Broker the Triggers subscribe to (default 'default')")
    add("--event-type", dest="event_type", help="CloudEvent type delivered to the model "
        "(default io.kserve.inference.request)")
    add("--schedule", help="the PingSource's cron schedule (default '*/15 * * * *')")
    add("--request", metavar="JSON", help="the V2 request the PingSource sends (default: one for the example mlp)")
    add("--dead-letter-sink", dest="dead_letter_sink", metavar="URL|SERVICE",
        help="where undeliverable events go: an http(s) URL or a Knative Service (default event-display)")
    add("--retry", type=int, help="delivery retries, with exponential backoff from 0.5 s (default 5)")


_EVENTING_FIELDS = ("broker", "event_type", "schedule", "request", "dead_letter_sink", "retry")


def _eventing_options(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> Any:
    from zeroserve.eventing import EventingOptions

    given = {field: getattr(ns, field) for field in _EVENTING_FIELDS if getattr(ns, field) is not None}
    try:
        return EventingOptions(**given)
    except ValueError as exc:
        # The messages start with the field's name; say the flag instead.
        field = re.compile(r"^(" + "|".join(_EVENTING_FIELDS) + r")\b")
        parser.error(field.sub(lambda m: "--" + m[1].replace("_", "-"), str(exc)))


def rendered(parser: argparse.ArgumentParser, options: RenderOptions, target: str) -> list[dict[str, Any]]:
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
