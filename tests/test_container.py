"""The CPU runtime image built by a real Docker engine and run the way each manifest in knative/ says.

Each variant's container spec is read from the rendered files (knative/cpu, knative/grpc, knative/kserve) and
started as kubelet, Knative and KServe would start it (see tests/container_pod.py): its args, environment,
port, read-only root filesystem as uid 10001 with every capability dropped and no privilege escalation, tmpfs
emptyDirs, CPU and memory limits. The Knative variants fetch the model from a real S3 API (moto's server on
loopback, with IAM authentication on) with the credentials and endpoint the rendered manifest passes: env from
the Secret's keys. The KServe variant reads the model mounted read-only at /mnt/models, as its storage
initializer leaves it. Every variant must answer a correct V2 inference and end on ``docker stop`` with exit 0
inside its grace period. The image itself must hold no installer, no tests, no build tools, and bytecode only.

The image is ZEROSERVE_TEST_IMAGE when set (.ci/run builds it with scripts/build-image), else these tests build
it with scripts/build-image (PYTHON_IMAGE picks the base, ZEROSERVE_BUILD_NETWORK its --network). Without a
Docker engine, or without the base image, they are skipped with the reason, unless ZEROSERVE_REQUIRE_DOCKER=1
(as in .ci/run), which turns that into a failure.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import yaml
from container_pod import DOCKER, Container, PodSpec, docker, engine_problem, run
from triton_grpc_process import TritonProcess

from zeroserve import cli

import models as test_models

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("ZEROSERVE_REQUIRE_DOCKER") == "1"
SECRET = "model-store"
BUCKET, PREFIX = "my-bucket", "models/mlp"  # where the rendered manifests point (s3://my-bucket/models/mlp/)
BATCH = np.random.default_rng(11).standard_normal((3, 16)).astype(np.float32)
READY_TIMEOUT = 60.0  # well under the manifests' startup budget (120 s); the server is ready in about 0.5 s
BUILD_TOOLS = {"gcc", "cc", "c++", "g++", "make", "cmake", "ld", "as", "strip", "git", "pip", "pip3", "f2py",
               "wheel", "easy_install", "dpkg-buildpackage"}  # the base system's own apt and dpkg stay


def unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"ZEROSERVE_REQUIRE_DOCKER=1, but {reason}")
    pytest.skip(f"CONTAINER TESTS NOT RUN: {reason} (.ci/run runs them with a real engine)")


@pytest.fixture(scope="module")
def image() -> str:
    problem = engine_problem()
    if problem:
        unavailable(f"no Docker engine: {problem}")
    given = os.environ.get("ZEROSERVE_TEST_IMAGE")
    if given:
        docker("image", "inspect", given)  # fails naming the image when it is not there
        return given
    dockerfile = (REPO / "runtime-image" / "Dockerfile").read_text()
    default = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, re.M)[1]  # type: ignore[index]
    base = os.environ.get("PYTHON_IMAGE") or default
    if docker("image", "inspect", base, check=False).returncode != 0:
        pulled = docker("pull", base, timeout=300, check=False)
        if pulled.returncode != 0:
            unavailable(f"the base image {base} cannot be had ({pulled.stderr.strip()}); set PYTHON_IMAGE "
                        "(../shared/tools/offline-base-image makes one without a registry)")
    tag = "zeroserve-test:container"
    before = docker("image", "inspect", "--format", "{{.Id}}", tag, check=False).stdout.strip()
    network = os.environ.get("ZEROSERVE_BUILD_NETWORK")
    build = subprocess.run(
        [str(REPO / "scripts" / "build-image"), "--quiet", "--tag", tag, *(["--network", network] if network else [])],
        capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON_IMAGE": base},
    )
    assert build.returncode == 0, f"scripts/build-image failed:\n{build.stdout}\n{build.stderr}"
    after = docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
    if before and before != after:
        docker("image", "rm", before, check=False)  # the previous build of this tag, now dangling
    return tag


# -- a real S3 API with authentication, holding the model where the manifests point -------------------------------


def _moto_fixtures() -> ModuleType:
    # The S3 server fixture of tests/runtime/conftest.py, imported rather than copied (as bench/s3.py does).
    name = "_zeroserve_tests_runtime_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "runtime" / "conftest.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "mlp"
    model = test_models.mlp_model(folder / "model.onnx")
    folder.chmod(0o755)  # the container's user (10001) reads it through a bind mount
    model.chmod(0o644)
    return model


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Iterator[tuple[Any, dict[str, str]]]:
    """moto's S3 server with IAM authentication after three setup calls; yields it and a Secret's data."""
    import boto3

    with contextlib.ExitStack() as stack:
        with pytest.MonkeyPatch.context() as patch:  # the server process copies the environment when it starts
            patch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "3")  # create_user, create_access_key, put_user_policy
            log = tmp_path_factory.mktemp("moto") / "moto.log"
            server = stack.enter_context(_moto_fixtures().running_moto_server(log))
        anonymous = {"aws_access_key_id": "setup", "aws_secret_access_key": "setup", "region_name": "us-east-1"}
        iam = boto3.client("iam", endpoint_url=server.endpoint_url, **anonymous)
        iam.create_user(UserName="models")
        key = iam.create_access_key(UserName="models")["AccessKey"]
        iam.put_user_policy(UserName="models", PolicyName="read-models", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        secret = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        client = boto3.client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1",
                              aws_access_key_id=secret["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=secret["AWS_SECRET_ACCESS_KEY"])
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/model.onnx", Body=model_file.read_bytes())
        yield server, secret


# -- reading the rendered files, and rendering with the S3 options -------------------------------------------------


def read_manifests(path: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((REPO / "knative" / path).read_text()) if doc]


def render(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, Any]]:
    assert cli.main(["render", *args]) == 0
    return [doc for doc in yaml.safe_load_all(capsys.readouterr().out) if doc]


def with_s3(capsys: pytest.CaptureFixture[str], file: str, endpoint: str, *variant: str) -> dict[str, Any]:
    """``zeroserve render`` of the file's variant with S3 credentials; it must differ from the file only by env."""
    [from_file] = read_manifests(file)
    name = from_file["metadata"]["name"]
    [service] = render(capsys, "--name", name, "--model-name", "mlp", *variant, "--s3-secret", SECRET,
                       "--s3-endpoint", endpoint, "--s3-region", "us-east-1")
    container = service["spec"]["template"]["spec"]["containers"][0]
    env = container.pop("env")
    assert service == from_file, f"--s3-* changed more than the env of knative/{file}"
    container["env"] = env
    return service


# -- checks --------------------------------------------------------------------------------------------------------


def expected_output(model_file: Path) -> np.ndarray:
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": BATCH})[0])


def infer_rest(container: Container, port: int, model_file: Path) -> None:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(BATCH.shape),
                        "data": BATCH.ravel().tolist()}]}
    answer = httpx.post(f"http://127.0.0.1:{container.host_port(port)}/v2/models/mlp/infer", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    [output] = answer.json()["outputs"]
    assert output["name"] == "output" and output["shape"] == [3, 4]
    got = np.array(output["data"], np.float32).reshape(3, 4)
    np.testing.assert_allclose(got, expected_output(model_file), rtol=1e-5, atol=1e-5)


def infer_grpc(container: Container, port: int, model_file: Path) -> None:
    # tritonclient.grpc runs in a child process: its protobuf modules clash with KServe's in this one.
    client = TritonProcess(f"127.0.0.1:{container.host_port(port)}")
    try:
        answer = client.infer("mlp", {"input": BATCH})
        assert answer["ok"], answer
        np.testing.assert_allclose(answer["outputs"]["output"], expected_output(model_file), rtol=1e-5, atol=1e-5)
    finally:
        client.close()


def wait_grpc_ready(container: Container, port: int) -> None:
    client = TritonProcess(f"127.0.0.1:{container.host_port(port)}")
    try:
        container.wait(lambda: client.call("ready").get("value") is True, "gRPC ServerReady", READY_TIMEOUT)
    finally:
        client.close()


def process_uid(container: Container) -> int:
    pid = container.state()["Pid"]
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Uid:\s+(\d+)", status, re.M)[1])  # type: ignore[index]


@contextlib.contextmanager
def running(image: str, pod: PodSpec, name: str, **kwargs: Any) -> Iterator[Container]:
    """The container for the block; afterwards ``docker stop`` must end it with exit 0 within its grace period."""
    container = run(image, pod, name=f"zeroserve-test-{name}-{os.getpid()}", **kwargs)
    try:
        yield container
        assert process_uid(container) == 10001
        write = docker("exec", container.id, "touch", "/opt/zeroserve/written", check=False)
        assert write.returncode != 0 and "Read-only file system" in write.stderr, write
        code, seconds = container.stop()
        assert code == 0, f"exit {code} on SIGTERM:\n{container.logs()}"
        assert seconds < pod.grace_seconds, f"took {seconds:.1f} s of a {pod.grace_seconds} s grace period"
    finally:
        container.remove()


# -- the variants -------------------------------------------------------------------------------------------------


def test_knative_cpu_service_fetches_its_model_from_s3_with_the_secrets_keys(
    image: str, s3: Any, model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, secret = s3
    reads_before = server.object_reads(BUCKET).count(f"{PREFIX}/model.onnx")
    service = with_s3(capsys, "cpu/service.yaml", server.endpoint_url)
    pod = PodSpec.of_knative_service(service)
    probe = pod.container["readinessProbe"]["httpGet"]
    with running(image, pod, "cpu", secrets={SECRET: secret}, knative_service="mlp") as container:
        container.wait_http(probe["path"], probe["port"], READY_TIMEOUT)
        infer_rest(container, probe["port"], model_file)
    # The model came from the S3 API, read with the Secret's keys (moto checks them).
    assert server.object_reads(BUCKET).count(f"{PREFIX}/model.onnx") == reads_before + 1


def test_wrong_s3_keys_end_the_container_with_a_message_naming_them(
    image: str, s3: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # Kubelet would restart it (CrashLoopBackOff) and `kubectl logs` would show this line.
    server, secret = s3
    pod = PodSpec.of_knative_service(with_s3(capsys, "cpu/service.yaml", server.endpoint_url))
    wrong = {**secret, "AWS_SECRET_ACCESS_KEY": "not-" + secret["AWS_SECRET_ACCESS_KEY"]}
    container = run(image, pod, name=f"zeroserve-test-badkeys-{os.getpid()}", secrets={SECRET: wrong},
                    knative_service="mlp")
    try:
        probe = pod.container["readinessProbe"]["httpGet"]
        with pytest.raises(RuntimeError, match=r"exited \(1\) before 200") as failed:
            container.wait_http(probe["path"], probe["port"], READY_TIMEOUT)
        assert "signature you provided" in str(failed.value) and "check the credentials" in str(failed.value)
    finally:
        container.remove()


def test_knative_grpc_service_answers_tritonclient_on_its_h2c_port(
    image: str, s3: Any, model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, secret = s3
    service = with_s3(capsys, "grpc/service.yaml", server.endpoint_url, "--grpc")
    pod = PodSpec.of_knative_service(service)
    [port] = pod.container["ports"]
    assert port["name"] == "h2c"
    probe = pod.container["readinessProbe"]["httpGet"]  # REST inside the pod, for the probes
    with running(image, pod, "grpc", secrets={SECRET: secret}, knative_service="mlp-grpc") as container:
        container.wait_http(probe["path"], probe["port"], READY_TIMEOUT)
        infer_grpc(container, port["containerPort"], model_file)
        infer_rest(container, probe["port"], model_file)


def test_grpc_only_mode_serves_on_knatives_port(
    image: str, s3: Any, model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The gRPC variant with --protocol=grpc instead of its REST-for-the-probes pair of ports: gRPC alone, on the
    # one port Knative declares (h2c) and passes as PORT.
    server, secret = s3
    service = with_s3(capsys, "grpc/service.yaml", server.endpoint_url, "--grpc")
    pod = PodSpec.of_knative_service(service)
    container_spec = pod.container
    container_spec["args"] = [a for a in container_spec["args"] if not a.startswith(("--protocol", "--http_port",
                                                                                    "--grpc_port"))]
    container_spec["args"].append("--protocol=grpc")
    for probe in ("readinessProbe", "startupProbe", "livenessProbe"):
        container_spec.pop(probe)
    [port] = container_spec["ports"]
    with running(image, pod, "grpconly", secrets={SECRET: secret}, knative_service="mlp-grpc") as container:
        wait_grpc_ready(container, port["containerPort"])
        infer_grpc(container, port["containerPort"], model_file)
        assert "--grpc_port" not in " ".join(container_spec["args"])  # the port came from PORT


def test_kserve_runtime_serves_the_model_its_storage_initializer_mounted(image: str, model_file: Path) -> None:
    runtime, isvc = read_manifests("kserve/runtime.yaml") + read_manifests("kserve/isvc.yaml")
    pod = PodSpec.of_inference_service(runtime, isvc)
    assert "--model_name=mlp-kserve" in pod.container["args"] and pod.container["args"][-1] == "--model_name=mlp"
    probe = pod.container["readinessProbe"]["httpGet"]
    # KServe's revision is a Knative one: PORT is the runtime's container port, the service NAME-predictor.
    with running(image, pod, "kserve", binds={str(model_file.parent): "/mnt/models"},
                 knative_service=f"{isvc['metadata']['name']}-predictor") as container:
        container.wait_http(probe["path"], probe["port"], READY_TIMEOUT)
        infer_rest(container, probe["port"], model_file)


# -- what the image holds -----------------------------------------------------------------------------------------


@dataclass
class ImageFiles:
    """The image's filesystem as ``docker export`` streams it: no tool inside the image is relied on."""

    modes: dict[str, int] = field(default_factory=dict)  # path -> mode, regular files and folders
    pyc_flags: dict[str, int] = field(default_factory=dict)  # .pyc path -> the flags word of its header

    @classmethod
    def of(cls, image: str) -> ImageFiles:
        found = cls()
        created = docker("create", image).stdout.strip()
        try:
            with subprocess.Popen([DOCKER, "export", created], stdout=subprocess.PIPE) as export:
                assert export.stdout is not None
                with tarfile.open(fileobj=export.stdout, mode="r|") as archive:
                    for member in archive:
                        path = "/" + member.name.removeprefix("./").lstrip("/")
                        found.modes[path] = member.mode | (0o40000 if member.isdir() else 0)
                        if path.endswith(".pyc") and member.isfile():
                            header = archive.extractfile(member)
                            assert header is not None
                            found.pyc_flags[path] = int.from_bytes(header.read(8)[4:8], "little")
                assert export.wait(timeout=120) == 0
        finally:
            docker("rm", created, check=False)
        return found


def test_image_holds_the_server_and_nothing_to_build_or_install_with(image: str) -> None:
    files = ImageFiles.of(image)
    names = {path.rsplit("/", 1)[-1] for path in files.modes}
    installer = re.compile(r"pip|pip3[.\d]*|setuptools|pkg_resources|_distutils_hack|ensurepip|easy_install|wheel"
                           r"|distutils-precedence\.pth|(pip|setuptools|wheel)-[\d.]+(\.dist-info|-py3-none-any\.whl)")
    assert not {n for n in names if installer.fullmatch(n)}, "installers in the image"
    on_path = ("/bin", "/usr/bin", "/usr/local/bin", "/sbin", "/usr/sbin", "/opt/zeroserve/bin")
    executables = {p.rsplit("/", 1)[1] for p, mode in files.modes.items()
                   if p.rsplit("/", 1)[0] in on_path and mode & 0o111 and not mode & 0o40000}
    assert not executables & BUILD_TOOLS, executables & BUILD_TOOLS
    left = [p for p, mode in files.modes.items() if not mode & 0o40000
            and p.startswith(("/root/.cache/", "/tmp/", "/var/cache/zeroserve/"))]
    assert not left, f"files left by the build: {left}"
    venv = [p for p in files.modes if p.startswith("/opt/zeroserve/")]
    assert not [p for p in venv if re.search(r"/tests?/", p)], "test suites in the image"
    [minor] = {m[1] for p in venv if (m := re.match(r"/opt/zeroserve/lib/python3\.(\d+)/site-packages/", p))}
    assert f"/opt/zeroserve/lib/python3.{minor}/site-packages/zeroserve/runtime/__main__.py" in files.modes
    # Every module is byte-compiled, hash-based and never checked against its source (flags == 1).
    sources = [p for p in venv if p.endswith(".py") and "/site-packages/" in p]
    assert len(sources) > 1000
    for source in sources:
        folder, module = source.rsplit("/", 1)
        pyc = f"{folder}/__pycache__/{module[:-3]}.cpython-3{minor}.pyc"
        assert files.pyc_flags.get(pyc) == 1, f"{source}: {pyc} missing or not unchecked-hash"
    config = json.loads(docker("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    assert config["User"] == "10001:0"
    assert config["Entrypoint"] == ["/opt/zeroserve/bin/python", "-m", "zeroserve.runtime"]
    assert not any(e.startswith("PORT=") for e in config["Env"])  # Knative's to set
