"""The runtime image against an image of KServe's Python server with onnxruntime, built from the same base.

    .venv/bin/python bench/image.py [--python-image BASE] [--network host] [--runs 5] [--cached]

Both are built here (zeroserve with scripts/build-image; the peer from bench/peers/kserve_onnx.py, KServe 0.21 and
the same onnxruntime pin, by the same recipe: a virtualenv in a build stage, pip removed, bytecode compiled,
copied into the base) and measured in one run:

- size: uncompressed (``docker image inspect``) and compressed (each layer of ``docker save``, gzip level 6,
  which is ``docker save | gzip``), layer by layer, and the own layers (all but the base's);
- ``docker run`` to ready: from just before ``docker run`` until ``/v2/models/mlp/ready`` answers 200, polled every
  50 ms; both containers run the way knative/kserve runs the zeroserve image (read-only root as uid 10001, all
  capabilities dropped, tmpfs emptyDirs, 2 CPUs and 2 GiB, the model mounted read-only at /mnt/models), in turns,
  median of ``--runs``; each first answer is checked against onnxruntime.

Prints a report and writes bench/results/image-<stamp>.json. Build with ``DOCKER_BUILDKIT=0`` and ``--network
host`` on the machines whose registry traffic goes through the host (see docs/deploy.md).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import yaml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))
from container_pod import DOCKER, PodSpec, docker, run  # noqa: E402  (tests/ is not a package)

MODEL = REPO / "examples" / "models" / "mlp" / "model.onnx"
KSERVE = "kserve==0.21.0"
PEER_DOCKERFILE = """\
ARG PYTHON_IMAGE
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/kserve \\
 && /opt/kserve/bin/pip install --no-compile "%(kserve)s" "%(onnxruntime)s" \\
 && /opt/kserve/bin/pip uninstall --yes pip \\
 && python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/kserve/lib
COPY kserve_onnx.py /opt/kserve/kserve_onnx.py

FROM ${PYTHON_IMAGE}
RUN useradd --uid 10001 --gid 0 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin kserve
COPY --from=build /opt/kserve /opt/kserve
ENV PATH=/opt/kserve/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:0
# KServe writes Prometheus multiprocess files in its working directory: the writable /tmp.
WORKDIR /tmp
ENTRYPOINT ["/opt/kserve/bin/python", "/opt/kserve/kserve_onnx.py"]
"""


def build_zeroserve(tag: str, base: str, network: str | None, cached: bool) -> float:
    argv = [str(REPO / "scripts" / "build-image"), "--quiet", "--tag", tag]
    argv += ["--network", network] if network else []
    argv += [] if cached else ["--", "--no-cache"]
    start = time.monotonic()
    subprocess.run(argv, check=True, timeout=1800, env={**os.environ, "PYTHON_IMAGE": base})
    return time.monotonic() - start


def build_kserve(tag: str, base: str, network: str | None, cached: bool) -> float:
    pin = re.search(r"^ARG ONNXRUNTIME=(\S+)$", (REPO / "runtime-image" / "Dockerfile").read_text(), re.M)
    assert pin, "no ONNXRUNTIME pin in runtime-image/Dockerfile"
    with tempfile.TemporaryDirectory() as context:
        (Path(context) / "Dockerfile").write_text(PEER_DOCKERFILE % {"kserve": KSERVE, "onnxruntime": pin[1]})
        shutil.copy(BENCH / "peers" / "kserve_onnx.py", context)
        argv = ["build", "--quiet", "--build-arg", f"PYTHON_IMAGE={base}", "-t", tag, *(["--network", network]
                                                                                         if network else [])]
        argv += [] if cached else ["--no-cache"]
        start = time.monotonic()
        docker(*argv, context, timeout=1800)
        return time.monotonic() - start


def layers(image: str, base: str) -> list[dict[str, Any]]:
    """Each layer of ``image``, oldest first: the instruction that made it, its size, its gzip size, and whether
    the base image has it."""
    base_layers = set(json.loads(docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", base).stdout))
    found = []
    with tempfile.TemporaryDirectory() as folder:
        archive_path = Path(folder) / "image.tar"
        with archive_path.open("wb") as out:
            subprocess.run([DOCKER, "save", image], stdout=out, check=True, timeout=600)
        with tarfile.open(archive_path) as archive:
            [manifest] = json.load(_member(archive, "manifest.json"))
            config = json.load(_member(archive, manifest["Config"]))
            # The history entries that made a layer, in the order of the layers.
            made = [h.get("created_by", "") for h in config["history"] if not h.get("empty_layer")]
            for diff_id, member, command in zip(config["rootfs"]["diff_ids"], manifest["Layers"], made):
                raw = _member(archive, member)
                size, counter = 0, _Counter()
                with gzip.GzipFile(filename="", mode="wb", fileobj=counter, compresslevel=6) as packer:
                    while chunk := raw.read(1 << 20):
                        size += len(chunk)
                        packer.write(chunk)
                command = re.sub(r"^/bin/sh -c (#\(nop\) )?", "", command).strip()
                found.append({"diff_id": diff_id, "tar_bytes": size, "gzip_bytes": counter.count,
                              "base": diff_id in base_layers, "command": command[:100]})
    return found


def _member(archive: tarfile.TarFile, name: str) -> Any:
    found = archive.extractfile(name)
    assert found is not None, f"{name} missing from docker save's archive"
    return found


class _Counter:
    """A write-only file that only counts bytes."""

    def __init__(self) -> None:
        self.count = 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def pods() -> dict[str, PodSpec]:
    """The zeroserve container as knative/kserve runs it, and the peer under the very same pod settings."""
    runtime, isvc = (next(yaml.safe_load_all((REPO / "knative" / "kserve" / name).read_text()))
                     for name in ("runtime.yaml", "isvc.yaml"))
    isvc["metadata"]["name"] = "mlp"
    isvc["spec"]["predictor"]["model"].pop("args", None)
    zeroserve = PodSpec.of_inference_service(runtime, isvc)
    peer_container = {**json.loads(json.dumps(zeroserve.container)), "name": "kserve"}
    peer_container["args"] = ["--model_name=mlp", "--model_dir=/mnt/models", "--http_port=8080", "--grpc_port=8081"]
    peer_container["ports"] = [{"containerPort": 8080}, {"containerPort": 8081}]
    peer = PodSpec(peer_container, zeroserve.volumes, zeroserve.grace_seconds)
    return {"zeroserve": zeroserve, "kserve": peer}


def start_to_ready(images: dict[str, str], runs: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in images}
    expected = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"]).run(
        None, {"input": np.ones((2, 16), np.float32)})[0]
    specs = pods()
    for turn in range(runs):
        order = list(images) if turn % 2 == 0 else list(images)[::-1]
        for name in order:
            container = run(images[name], specs[name], name=f"bench-image-{name}-{os.getpid()}",
                            binds={str(MODEL.parent): "/mnt/models"})
            try:
                ready = container.wait_http("/v2/models/mlp/ready", 8080, timeout=120)
                times[name].append(ready)
                body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 16], "data": [1.0] * 32}]}
                answer = httpx.post(f"http://127.0.0.1:{container.host_port(8080)}/v2/models/mlp/infer",
                                    json=body, timeout=30).json()
                got = np.array(answer["outputs"][0]["data"], np.float32).reshape(expected.shape)
                np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
                container.stop()
            finally:
                container.remove()
            print(f"  {name}: ready {ready:.2f} s after docker run", file=sys.stderr)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python-image", default=os.environ.get("PYTHON_IMAGE", "python:3.11-slim-bookworm"))
    parser.add_argument("--network", help="docker build --network (host on machines like the CI's)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cached", action="store_true", help="let docker reuse its build cache")
    parser.add_argument("--keep", action="store_true", help="keep the two images")
    ns = parser.parse_args(argv)
    tags = {"zeroserve": "bench.local/zeroserve:image", "kserve": "bench.local/kserve-onnx:image"}
    print("building both images...", file=sys.stderr)
    build = {"zeroserve": build_zeroserve(tags["zeroserve"], ns.python_image, ns.network, ns.cached),
             "kserve": build_kserve(tags["kserve"], ns.python_image, ns.network, ns.cached)}
    sizes = {name: layers(tag, ns.python_image) for name, tag in tags.items()}
    print(f"docker run to ready, {ns.runs} runs each, in turns...", file=sys.stderr)
    ready = start_to_ready(tags, ns.runs)
    result = {"base": ns.python_image, "build_seconds": build, "layers": sizes, "ready_seconds": ready,
              "kserve": KSERVE, "machine": {"cpus": os.cpu_count(), "docker": docker("version", "--format",
                                                                                      "{{.Server.Version}}").stdout.strip()}}
    result["summary"] = summary(result)
    print(report(result))
    out = BENCH / "results" / f"image-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}", file=sys.stderr)
    if not ns.keep:
        for tag in tags.values():
            docker("image", "rm", tag, check=False)
    return 0


def summary(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    found = {}
    for name, layer_list in result["layers"].items():
        own = [layer for layer in layer_list if not layer["base"]]
        found[name] = {
            "total_mb": sum(layer["tar_bytes"] for layer in layer_list) / 1e6,
            "own_mb": sum(layer["tar_bytes"] for layer in own) / 1e6,
            "total_gzip_mb": sum(layer["gzip_bytes"] for layer in layer_list) / 1e6,
            "own_gzip_mb": sum(layer["gzip_bytes"] for layer in own) / 1e6,
            "ready_median_s": statistics.median(result["ready_seconds"][name]),
            "build_s": result["build_seconds"][name],
        }
    found["ratio"] = {key: found["zeroserve"][key] / found["kserve"][key] for key in found["zeroserve"]}
    return found


def report(result: dict[str, Any]) -> str:
    s = result["summary"]
    rows = [("own layers (MB)", "own_mb", 0.45), ("own layers, gzip (MB)", "own_gzip_mb", None),
            ("whole image (MB)", "total_mb", None), ("whole image, gzip (MB)", "total_gzip_mb", None),
            ("docker run to ready, median (s)", "ready_median_s", 0.5), ("build (s)", "build_s", None)]
    lines = [f"base {result['base']}; {result['kserve']} + the same onnxruntime", "",
             "| | zeroserve | KServe | zeroserve / KServe | goal |", "|---|---|---|---|---|"]
    for label, key, goal in rows:
        ratio = s["ratio"][key]
        verdict = "" if goal is None else (f"≤ {goal} " + ("met" if ratio <= goal else "NOT MET"))
        fmt = "{:.2f}" if key == "ready_median_s" else "{:.0f}"
        lines.append(f"| {label} | {fmt.format(s['zeroserve'][key])} | {fmt.format(s['kserve'][key])} | "
                     f"{ratio:.2f} | {verdict} |")
    for name in ("zeroserve", "kserve"):
        runs = ", ".join(f"{t:.2f}" for t in result["ready_seconds"][name])
        lines += ["", f"{name}: ready after {runs} s", "", "| layer | MB | gzip MB |", "|---|---|---|"]
        for layer in result["layers"][name]:
            label = "(base)" if layer["base"] else layer["command"].replace("|", "\\|")
            lines.append(f"| {label} | {layer['tar_bytes'] / 1e6:.1f} | {layer['gzip_bytes'] / 1e6:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
