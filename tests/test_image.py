"""The runtime images, without Docker: both Dockerfiles parsed by BuildKit's own parser (the ``dockerfile``
package) and checked for what the images promise, and the CPU image rehearsed.

The rehearsal builds the wheel, creates a fresh virtualenv with the Python minor version of the image's base
(falling back to this interpreter when none is installed), runs the build stage's own commands in it (the pip
install with the Dockerfile's extras and pins, pip's removal, the bytecode compilation), then runs the final
stage's smoke test and its ENTRYPOINT with its ENV, the args of knative/cpu/service.yaml and a PORT as Knative
injects it, and asks for a real inference. Image paths are mapped onto temporary folders; nothing else changes.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import dockerfile
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tomllib
import yaml
from packaging.requirements import Requirement

from zeroserve import render_options

import models as test_models
from conftest import unused_port

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
    assert "pip uninstall --yes pip" in build_runs  # not even pip in the copied venv


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


# -- the rehearsal ---------------------------------------------------------------------------------------------------


def python_for(minor: str) -> str:
    """An interpreter of the image's Python minor version, if this machine has one; else this interpreter."""
    candidates = [shutil.which(f"python{minor}") or ""]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates += sorted(str(p) for p in pyenv.glob(f"{minor}.*/bin/python{minor}"))
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == minor:
            return candidate
    return sys.executable


def run_checked(argv: list[str], **kwargs: object) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kwargs)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{' '.join(argv)} failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def rehearsed_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    image = IMAGES["cpu"]
    build = image.stage("build")
    root = tmp_path_factory.mktemp("image")
    venv, cache = root / "opt-zeroserve", root / "var-cache-zeroserve"
    cache.mkdir()
    paths = {VENV: str(venv), render_options.CACHE_DIR: str(cache)}
    minor = re.fullmatch(r"python:(\d+\.\d+)-.*", image.global_args["PYTHON_IMAGE"])[1]  # type: ignore[index]
    base_python = python_for(minor)

    run_checked([sys.executable, "-m", "build", "--wheel", "--outdir", str(root / "dist"), str(REPO)])
    [wheel] = (root / "dist").glob("zeroserve-*.whl")
    build_args = build.args(image.global_args)
    # The build stage's ENV, less PIP_NO_CACHE_DIR: the cache changes how fast, not what, pip installs.
    env = {**os.environ, **{k: v for k, v in build.env().items() if k != "PIP_NO_CACHE_DIR"}}
    for run in build.runs():
        for argv in shell_steps(run):
            argv = [expand(a, build_args) for a in argv]
            argv = [a.replace("/src[", f"{wheel}[") for a in argv]
            argv = [next((a.replace(k, v) for k, v in paths.items() if a.startswith(k)), a) for a in argv]
            if argv[0] == "python":  # the base image's interpreter
                argv[0] = base_python
            run_checked(argv, env=env)
    yield {"root": root, "venv": venv, "cache": cache}


def final_env(paths: Mapping[str, str]) -> dict[str, str]:
    """The final stage's ENV with image paths mapped, on a clean environment (what the container starts with)."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": paths[render_options.CACHE_DIR], "LANG": "C.UTF-8"}
    for key, value in IMAGES["cpu"].final.env().items():
        value = expand(value, env)
        for image_path, local in paths.items():
            value = value.replace(image_path, local)
        env[key] = value
    return env


@pytest.mark.slow
def test_rehearsal_installs_exactly_the_pinned_runtime(rehearsed_image: dict[str, Path]) -> None:
    python = rehearsed_image["venv"] / "bin" / "python"
    listing = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m, json; "
         "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))"],
        capture_output=True, text=True, check=True,
    )
    installed = json.loads(listing.stdout)
    args = IMAGES["cpu"].stage("build").args(IMAGES["cpu"].global_args)
    pin = Requirement(args["ONNXRUNTIME"])
    assert installed[pin.name] == str(pin.specifier)[2:]
    assert installed["zeroserve"] == render_options.VERSION
    assert {"starlette", "uvicorn", "numpy", "orjson", "fsspec"} <= set(installed)
    unwanted = {"pip", "pytest", "onnx", "kserve", "tritonclient", "moto", "hatchling", "build", "kubernetes",
                "onnxruntime-gpu", "grpcio", "s3fs", "flask"}
    extras = args["ZEROSERVE_EXTRAS"].split(",")
    unwanted -= {"grpcio"} if "grpc" in extras else set()
    unwanted -= {"s3fs"} if "s3" in extras else set()
    assert not unwanted & set(installed)
    # Bytecode is there and hash-based without source checks (flags == 1 in the .pyc header).
    [pyc] = (rehearsed_image["venv"] / "lib").glob("python3*/site-packages/zeroserve/runtime/__pycache__/app.*.pyc")
    assert int.from_bytes(pyc.read_bytes()[4:8], "little") == 1


@pytest.mark.slow
def test_rehearsal_entrypoint_answers_a_real_inference(rehearsed_image: dict[str, Path]) -> None:
    image = IMAGES["cpu"]
    paths = {VENV: str(rehearsed_image["venv"]), render_options.CACHE_DIR: str(rehearsed_image["cache"])}
    env = final_env(paths)
    # The final stage's smoke test, then the container as Knative starts it.
    smoke = next(r for r in image.final.runs() if r.startswith("python -c"))
    run_checked(shlex.split(smoke), env=env)
    model = test_models.mlp_model(rehearsed_image["root"] / "models" / "mlp" / "model.onnx")
    service = yaml.safe_load((REPO / "knative" / "cpu" / "service.yaml").read_text())
    [container] = service["spec"]["template"]["spec"]["containers"]
    args = [a if not a.startswith("--model_dir=") else f"--model_dir={model.parent}" for a in container["args"]]
    [entrypoint] = image.final.all("ENTRYPOINT")
    cmd = [c.value for c in image.final.all("CMD")]
    argv = [paths[VENV] + entrypoint.value[0][len(VENV):], *entrypoint.value[1:], *(cmd[0] if cmd else ()), *args]
    port = unused_port()
    env |= {"PORT": str(port), "K_SERVICE": "mlp", "K_CONFIGURATION": "mlp", "K_REVISION": "mlp-00001"}
    # Listen on loopback only here; in the pod the server's default (all interfaces) is what Knative needs.
    log_path = rehearsed_image["root"] / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([*argv, "--host", "127.0.0.1"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "not ready after 60 s:\n" + log_path.read_text()
            time.sleep(0.05)
        batch = np.random.default_rng(7).standard_normal((3, 16)).astype(np.float32)
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [3, 16], "data": batch.ravel().tolist()}]}
        answer = httpx.post(f"{url}/v2/models/mlp/infer", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        [output] = answer.json()["outputs"]
        expected = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": batch})[0]
        assert output["shape"] == [3, 4]
        np.testing.assert_allclose(np.array(output["data"], np.float32).reshape(3, 4), expected, rtol=1e-5, atol=1e-5)
        # The process runs from the rehearsed virtualenv, not this test's environment.
        assert Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")[0] == argv[0].encode()
    finally:
        process.send_signal(signal.SIGTERM)  # as Knative scales down: drain, then exit 0
        try:
            code = process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
            raise
    # uvicorn re-raises the SIGTERM it handled once the drain is done: "terminated by SIGTERM" is a clean exit.
    assert code in (0, -signal.SIGTERM), log_path.read_text()
    assert "Application shutdown complete" in log_path.read_text()
