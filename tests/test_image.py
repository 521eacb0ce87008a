"""The runtime images, without Docker: both Dockerfiles parsed by BuildKit's own parser (the ``dockerfile``
package) and checked for what the images promise, and the build context checked against .dockerignore.

The GPU image cannot be built here (its CUDA base cannot be pulled), so this is all that runs for it on a machine
without a GPU; tests/test_container.py builds and runs the CPU image with a real engine.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import dockerfile
import pytest
import tomllib
from packaging.requirements import Requirement

from zeroserve import render_options

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cpu": REPO / "runtime-image" / "Dockerfile", "gpu": REPO / "runtime-image" / "Dockerfile.gpu"}
VENV = "/opt/zeroserve"
UID = "10001"
BUILD_TOOLS = {"gcc", "g++", "make", "build-essential", "python3-dev", "python3-venv", "python3-pip", "git", "curl",
               "wget", "cmake", "pip", "hatchling", "build"}
# onnxruntime-gpu release -> the CUDA major its default PyPI wheel is built for (ONNX Runtime's GPU matrix);
# every one of them links TensorRT 10 (libnvinfer.so.10).
ORT_GPU_CUDA = {(1, 20): 12, (1, 21): 12, (1, 22): 12, (1, 23): 12, (1, 24): 12, (1, 25): 12, (1, 26): 12,
                (1, 27): 13, (1, 28): 13, (1, 29): 13, (1, 30): 13, (1, 31): 13}


# -- reading a Dockerfile ----------------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str  # the FROM image or stage, ARGs expanded
    name: str | None
    commands: list[dockerfile.Command] = field(default_factory=list)

    def all(self, cmd: str) -> list[dockerfile.Command]:
        return [c for c in self.commands if c.cmd == cmd]

    def args(self, global_args: Mapping[str, str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for command in self.all("ARG"):
            name, _, default = command.value[0].partition("=")
            found[name] = default if default else global_args.get(name, "")
        return found

    def env(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for command in self.all("ENV"):
            pairs = command.value
            for key, value in zip(pairs[::2], pairs[1::2]):
                found[key] = value
        return found

    def runs(self) -> list[str]:
        return [c.value[0] for c in self.all("RUN")]


@dataclass
class Image:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def parse(path: Path) -> Image:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for command in dockerfile.parse_file(str(path)):
        if command.cmd == "FROM":
            words = command.value
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(expand(words[0], global_args), name))
        elif not stages:
            assert command.cmd == "ARG", f"only ARG may precede the first FROM, got {command.original}"
            key, _, default = command.value[0].partition("=")
            global_args[key] = default
        else:
            stages[-1].commands.append(command)
    return Image(path, global_args, stages)


def expand(text: str, variables: Mapping[str, str]) -> str:
    """Expand ${X} and $X from ``variables``; unknown names are left as they are."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), text)


def shell_steps(run: str) -> list[list[str]]:
    """A RUN line as its &&-separated commands, each split like a shell would (for the simple lines here)."""
    return [shlex.split(part) for part in re.split(r"\s&&\s", run)]


def step(stage: Stage, head: list[str]) -> list[str]:
    """The one command in ``stage``'s RUN lines that starts with ``head``."""
    found = [s for run in stage.runs() for s in shell_steps(run) if s[: len(head)] == head]
    assert len(found) == 1, f"expected one {' '.join(head)} in {[c.original for c in stage.all('RUN')]}"
    return found[0]


IMAGES = {kind: parse(path) for kind, path in DOCKERFILES.items()}


@pytest.fixture(params=sorted(IMAGES))
def image(request: pytest.FixtureRequest) -> Image:
    return IMAGES[request.param]


# -- the properties --------------------------------------------------------------------------------------------------


def test_dockerfiles_parse_and_pin_the_frontend(image: Image) -> None:
    assert image.path.read_text().startswith("# syntax=docker/dockerfile:1\n")
    assert len(image.stages) >= 2


def test_base_images_are_pinned_and_both_stages_share_the_interpreter(image: Image) -> None:
    names = {s.name for s in image.stages if s.name}
    for stage in image.stages:
        if stage.base in names:
            continue
        repo, _, tag = stage.base.rpartition(":")
        assert repo and tag and tag != "latest" and "$" not in stage.base, stage.base
    # The virtualenv's python is a link to the base interpreter, so the build and final stages start alike.
    build = image.stage("build")
    root = {s.name: s.base for s in image.stages if s.name}
    assert root.get(build.base, build.base) == root.get(image.final.base, image.final.base)


def test_final_stage_has_no_build_tools_or_sources(image: Image) -> None:
    final = image.final
    [copy] = [c for c in final.all("COPY") if c.flags]
    assert copy.flags == ("--from=build",) and copy.value == (VENV, VENV)
    assert len(final.all("COPY")) == 1 and not final.all("ADD")
    for run in final.runs():
        words = set(re.split(r"[\s;&|]+", run))
        assert not words & BUILD_TOOLS, run
        assert "install" not in words or "install -d" in run, run  # no package installs, only install -d
    build_runs = " ".join(image.stage("build").runs())
    assert "pip uninstall --yes pip setuptools" in build_runs  # no installer in the copied venv
    assert "find . -depth -type d -name tests -exec rm -rf {} +" in build_runs  # nor anyone's test suite


def test_only_the_runtime_extras_are_installed_with_onnxruntime_pinned(image: Image) -> None:
    build = image.stage("build")
    args = build.args(image.global_args)
    pip = step(build, [f"{VENV}/bin/pip", "install", "--no-compile", "/src[${ZEROSERVE_EXTRAS}]"])
    assert pip[4:] == ["${ONNXRUNTIME}"]  # the ARGs are what is installed, nothing more
    extras = set(args["ZEROSERVE_EXTRAS"].split(","))
    pin = Requirement(args["ONNXRUNTIME"])
    assert str(pin.specifier).startswith("==")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras <= set(pyproject), f"pip only warns about an unknown extra: {extras - set(pyproject)}"
    # The gRPC manifests (knative/grpc, KServe's grpc-v2) need the image to serve gRPC: once the project has a
    # grpc extra, both images install it (importing it costs nothing unless gRPC is turned on).
    # The rendered manifests fetch the model from an s3:// URI, so both images read S3 too.
    grpc = {"grpc"} & set(pyproject)
    if image.path.name == "Dockerfile":
        assert extras == {"runtime", "cpu", "s3"} | grpc and pin.name == "onnxruntime", "set ARG ZEROSERVE_EXTRAS"
    else:
        # The CUDA base image holds CUDA and cuDNN: onnxruntime-gpu without its [cuda,cudnn] pip copies.
        assert extras == {"runtime", "s3"} | grpc and pin.name == "onnxruntime-gpu", "set ARG ZEROSERVE_EXTRAS"
        assert not pin.extras
        pyproject = {"gpu": pyproject["gpu"]}
    # The pin satisfies what the extra asks for.
    for spec in (Requirement(r) for reqs in pyproject.values() for r in reqs):
        if spec.name == pin.name:
            assert spec.specifier.contains(str(pin.specifier)[2:]), (spec, pin)


def test_gpu_versions_fit_onnxruntimes_matrix() -> None:
    image = IMAGES["gpu"]
    args = image.stage("build").args(image.global_args)
    [pin] = Requirement(args["ONNXRUNTIME"]).specifier
    major, minor = (int(x) for x in pin.version.split(".")[:2])
    cuda_major = ORT_GPU_CUDA[major, minor]
    base = image.global_args["CUDA_IMAGE"]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn-runtime-ubuntu(\d+\.\d+)", base)
    assert match, base
    assert int(match[1]) == cuda_major  # a runtime image (no compilers), with cuDNN
    trt = Requirement(args["TENSORRT_LIBS"])
    assert trt.name == f"tensorrt-cu{cuda_major}-libs"
    assert str(trt.specifier).startswith("==10.")  # ORT's TensorRT EP links libnvinfer.so.10; TensorRT 11 won't load
    trt_pip = step(image.stage("build"), [f"{VENV}/bin/pip", "install", "--no-compile", "--no-deps"])
    assert trt_pip[trt_pip.index("--extra-index-url") + 1] == "https://pypi.nvidia.com"  # PyPI has only stubs


def test_gpu_image_puts_tensorrt_on_the_loader_path() -> None:
    image = IMAGES["gpu"]
    link = step(image.stage("build"), ["ln", "-s"])
    assert link[-1] == f"{VENV}/tensorrt"
    ld_path = image.final.env()["LD_LIBRARY_PATH"].split(":")
    assert ld_path == [f"{VENV}/tensorrt", "$LD_LIBRARY_PATH"]  # first, and the base image's paths kept
    # The build fails when a library the execution providers link against cannot be found.
    check = next(r for r in image.final.runs() if "ldd" in r)
    assert "libonnxruntime_providers_*.so" in check and "not found" in check and "exit 1" in check


def test_non_root_numeric_user_with_a_writable_cache(image: Image) -> None:
    final = image.final
    [user] = final.all("USER")
    uid, _, gid = user.value[0].partition(":")
    assert uid == UID and gid == "0"
    assert final.commands.index(user) > max(final.commands.index(c) for c in final.all("RUN"))
    env = final.env()
    assert env["ZEROSERVE_CACHE_DIR"] == render_options.CACHE_DIR  # what the manifests mount an emptyDir on
    setup = " ".join(final.runs())
    assert f"useradd --uid {UID}" in setup
    assert f"install -d -m 0775 -o {UID} -g 0 {render_options.CACHE_DIR}" in setup


def test_exec_form_entrypoint_and_knatives_port(image: Image) -> None:
    final = image.final
    [entrypoint] = final.all("ENTRYPOINT")
    assert entrypoint.json, "ENTRYPOINT must be exec form so the server is PID 1 and gets SIGTERM"
    assert list(entrypoint.value) == [f"{VENV}/bin/python", "-m", "zeroserve.runtime"]
    assert all(c.json for c in final.all("CMD"))
    assert "PORT" not in final.env()  # Knative injects it; the server listens on it
    assert [c.value for c in final.all("EXPOSE")] == [(str(render_options.HTTP_PORT),)]


def test_bytecode_is_precompiled_in_the_build_stage(image: Image) -> None:
    compile_step = next(s for run in image.stage("build").runs() for s in shell_steps(run) if "compileall" in s)
    assert compile_step[-1] == f"{VENV}/lib"
    assert compile_step[compile_step.index("--invalidation-mode") + 1] == "unchecked-hash"
    assert "-f" in compile_step  # pip leaves some timestamp-checked .pyc files behind; rewrite them too
    assert image.final.env()["PYTHONDONTWRITEBYTECODE"] == "1"


# -- the build context -------------------------------------------------------------------------------------------------


def dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    keep = True
    parts = path.split("/")
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = os.path.normpath(raw.lstrip("!"))
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            keep = negate
    return keep


def context_files() -> set[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    return {f for f in tracked if dockerignore_allows(f, patterns)}


def test_build_context_holds_what_the_wheel_needs_and_nothing_else() -> None:
    files = context_files()
    assert {"pyproject.toml", "README.md"} <= files
    for package in ("plugin/zeroserve", "runtime-image/zeroserve"):
        sources = {str(p.relative_to(REPO)) for p in (REPO / package).rglob("*.py")}
        assert sources and sources <= files, sources - files
    for image in IMAGES.values():
        for copy in image.stage("build").all("COPY"):
            for source in copy.value[:-1]:
                assert any(f == source or f.startswith(source + "/") for f in files), source
    assert not {f for f in files if f.startswith(("tests/", "bench/", ".git/", ".venv/", "knative/", "examples/"))}
    assert not fnmatch.filter(files, "*.pyc")
