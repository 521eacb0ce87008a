"""The ``zeroserve`` command: ``render`` prints exactly the repository's files, writes and checks the tree, says
which flag is wrong; ``serve`` is unchanged; the command stays light."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.knative.conftest import run
from zeroserve import render as rendering
from zeroserve.render_options import RenderOptions, Toleration

REPO = Path(__file__).resolve().parents[2]


def read(path: str) -> str:
    return (REPO / "knative" / path).read_text(encoding="utf-8")


def test_render_with_defaults_prints_the_cpu_service_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["render"], capsys) == (0, read("cpu/service.yaml"), "")


@pytest.mark.parametrize(
    ("args", "files"),
    [
        (["--gpu", "--name", "mlp-gpu", "--model-name", "mlp"], ["gpu/service.yaml"]),
        (["--grpc", "--name", "mlp-grpc", "--model-name", "mlp"], ["grpc/service.yaml"]),
        (["--kserve", "--name", "mlp-kserve", "--model-name", "mlp"], ["kserve/runtime.yaml", "kserve/isvc.yaml"]),
    ],
)
def test_render_variants_print_the_repository_files(
    args: list[str], files: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["render", *args], capsys) == (0, "---\n".join(read(f) for f in files), "")


def test_render_options_reach_the_manifest(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["render", "--name", "bert", "--model-uri", "gs://b/bert/", "--image", "reg.example/zs:1", "-n", "ml",
            "--min-scale", "1", "--max-scale", "7", "--target-concurrency", "2", "--container-concurrency", "3",
            "--cold-start", "90", "--no-startup-probe"]
    code, out, err = run(args, capsys)
    assert code == 0
    expected = RenderOptions(
        name="bert", model_uri="gs://b/bert/", image="reg.example/zs:1", namespace="ml", min_scale=1, max_scale=7,
        target_concurrency=2, container_concurrency=3, cold_start=90, startup_probe=False,
    )
    assert out == rendering.to_yaml(rendering.render(expected), comments=[rendering.explain(expected)])
    assert err == f"zeroserve render: warning: {rendering.notes(expected)[0]}\n"
    assert "never scales to zero" in err


def test_render_access_flags_reach_the_manifest(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["render", "--s3-secret", "creds", "--s3-endpoint", "http://minio:9000", "--s3-region", "us-east-1",
            "--service-account", "sa", "--image-pull-secret", "r1", "--image-pull-secret", "r2", "--env", "A=1,2",
            "--env", "B=", "--env-from-secret", "extra", "--requests", "cpu=250m,memory=512Mi", "--limits",
            "memory=1Gi", "--node-selector", "pool=gpu", "--toleration", "nvidia.com/gpu:NoSchedule",
            "--otel-endpoint", "http://otel:4318"]
    code, out, err = run(args, capsys)
    assert code == 0
    expected = RenderOptions(
        s3_secret="creds", s3_endpoint="http://minio:9000", s3_region="us-east-1", service_account="sa",
        image_pull_secrets=("r1", "r2"), env=(("A", "1,2"), ("B", "")), env_from_secrets=("extra",),
        requests=(("cpu", "250m"), ("memory", "512Mi")), limits=(("memory", "1Gi"),),
        node_selector=(("pool", "gpu"),), tolerations=(Toleration("nvidia.com/gpu", effect="NoSchedule"),),
        otel_endpoint="http://otel:4318",
    )
    assert out == rendering.to_yaml(rendering.render(expected), comments=[rendering.explain(expected)])
    assert err.count("is off in a default Knative") == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "Bad"], "zeroserve render: error: name 'Bad' must be a DNS-1035 label"),
        (["--model-name", "a b"], "error: --model-name 'a b' must be letters"),
        (["--min-scale", "3", "--max-scale", "2"], "error: --max-scale (2) is below --min-scale (3)"),
        (["--target-concurrency", "9"], "--target-concurrency (9) is above --container-concurrency (8)"),
        (["--cold-start", "x"], "argument --cold-start: invalid int value: 'x'"),
        (["--check"], "--check needs --out-dir"),
        (["--out-dir", "somewhere", "--gpu", "--image", "i"], "drop --gpu, --image"),
        (["--env", "PORT=9"], "error: --env PORT is Knative's to set"),
        (["--env", "NOVALUE"], "error: --env takes NAME=VALUE, got 'NOVALUE'"),
        (["--requests", "cpu"], "error: --requests takes NAME=VALUE items, got 'cpu'"),
        (["--limits", "cpu=100m"], "error: --requests cpu=1 is above --limits cpu=100m"),
        (["--toleration", "gpu:Never"], "error: toleration effect must be one of"),
        (["--s3-endpoint", "minio:9000"], "error: --s3-endpoint must be an http:// or https:// URL"),
        (["--image-pull-secret", "Bad"], "error: 'Bad' is not a valid Secret or ServiceAccount name"),
        (["--kserve", "--s3-region", "us-east-1"], "error: under KServe the storage initializer reads --s3-endpoint"),
    ],
)
def test_render_errors_name_the_flag(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["render", *args], capsys)
    assert code == 2 and out == ""
    assert message in err


def test_render_out_dir_writes_the_tree_and_check_finds_drift(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["render", "--out-dir", str(tmp_path)], capsys)[0] == 0
    written = {str(p.relative_to(tmp_path)): p.read_text() for p in tmp_path.rglob("*") if p.is_file()}
    assert written == rendering.layout()
    assert run(["render", "--out-dir", str(tmp_path), "--check"], capsys)[0] == 0
    (tmp_path / "gpu" / "service.yaml").write_text("edited by hand\n")
    (tmp_path / "cpu" / "kustomization.yaml").unlink()
    (tmp_path / "cpu" / "old.yaml").write_text("kind: Leftover\n")
    code, _, err = run(["render", "--out-dir", str(tmp_path), "--check"], capsys)
    assert code == 1
    assert "gpu/service.yaml differs" in err and "cpu/kustomization.yaml differs" in err
    assert "cpu/old.yaml is not part of the rendered tree" in err


def test_repository_folder_passes_check(capsys: pytest.CaptureFixture[str]) -> None:
    # What .ci/run can run to catch a hand edit: zeroserve render --out-dir knative --check
    assert run(["render", "--out-dir", str(REPO / "knative"), "--check"], capsys) == (0, "", "")


def test_top_level_help_and_unknown_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    assert all(f"\n  {command} " in out for command in ("serve", "render", "deploy", "status"))
    assert run([], capsys)[0] == 2
    code, _, err = run(["apply"], capsys)
    assert code == 2 and "unknown command 'apply'" in err


def test_serve_still_hands_everything_to_the_runtime(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["serve", "--help"], capsys)
    assert code == 0
    assert out.startswith("usage: zeroserve serve") and "--model_name" in out and "--trt_engine_cache_path" in out


def test_status_and_deploy_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["deploy", "--help"], capsys)
    assert code == 0 and "--kubeconfig" in out and "--model-uri" in out and "-f FILE" in out
    code, out, _ = run(["status", "--help"], capsys)
    assert code == 0 and "--kserve" in out


def test_render_loads_no_cluster_client_and_nothing_heavy() -> None:
    code = (
        "import sys, json\n"
        "from zeroserve import cli\n"
        "import contextlib, io\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert cli.main(['render', '--kserve']) == 0\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    modules = set(json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                            text=True, timeout=60).stdout))
    heavy = {"kubernetes", "yaml", "urllib3", "numpy", "onnxruntime", "starlette", "httpx", "zeroserve.deploy"}
    assert modules & heavy == set()


def test_console_script_renders(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "zeroserve", "render", "--grpc"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "name: h2c" in result.stdout


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--version"], capsys) == (0, f"zeroserve {importlib.metadata.version('zeroserve')}\n", "")
    assert run(["-V"], capsys)[0] == 0


@pytest.mark.slow
def test_serve_and_dev_without_the_server_extras_name_the_extra(tmp_path: Path) -> None:
    # A fresh virtualenv with `pip install zeroserve` and nothing else, from the wheel the project builds.
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist"), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("zeroserve-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], check=True, capture_output=True,
                   timeout=600)
    command = str(venv / "bin" / "zeroserve")
    for args in (["serve", "--model_dir", str(tmp_path)], ["dev", "--model_dir", str(tmp_path)]):
        result = subprocess.run([command, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.splitlines()  # one line, no traceback
        assert line.startswith(f"zeroserve {args[0]} needs the server extras (")
        assert "uvicorn" in line and "onnxruntime" in line and "pip install 'zeroserve[runtime,cpu]'" in line
    help_text = subprocess.run([command, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert help_text.returncode == 0 and "--model_dir" in help_text.stdout  # the flags are readable before installing
    version = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout == f"zeroserve {importlib.metadata.version('zeroserve')}\n"
