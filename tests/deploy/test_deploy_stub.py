"""``zeroserve deploy`` / ``status`` against the stub Kubernetes API of conftest.py (no cluster runs here).

Every test that talks to an API server says ``stub`` in its name: what they prove is that zeroserve makes the
right calls (discovery, server-side apply, reads) and handles the answers, not that a real cluster agrees.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from kube_stub import KubeStub, write_kubeconfig

from zeroserve import cli
from zeroserve import render as rendering
from zeroserve.deploy import (
    Cluster,
    DeployError,
    MissingAPIError,
    NoClusterError,
    NotFoundError,
    NotReadyError,
    ReadyTimeout,
    deploy,
    ready_condition,
    ready_timeout,
    status,
)
from zeroserve.render_options import RenderOptions

REPO = Path(__file__).resolve().parents[2]
FAST = {"poll": 0.01, "false_grace": 0.05}


def connect(stub: KubeStub, **kwargs: str) -> Cluster:
    return Cluster.connect(kubeconfig=str(stub.kubeconfig), environ={}, **kwargs)


def test_stub_deploy_applies_server_side_and_waits_for_ready(kube_stub: KubeStub) -> None:
    manifests = rendering.render(RenderOptions())
    progress: list[str] = []
    [obj] = deploy(connect(kube_stub), manifests, on_progress=progress.append, **FAST)

    assert obj["status"]["url"] == "http://mlp.models.example.com"
    path = "/apis/serving.knative.dev/v1/namespaces/models/services/mlp"  # the context's namespace
    [apply] = [r for r in kube_stub.requests if r.method == "PATCH"]
    assert apply.path == path
    assert apply.headers["content-type"] == "application/apply-patch+yaml"
    # force: "true" or "True" by client version; the API server parses both (Go's strconv.ParseBool).
    assert apply.query["fieldManager"] == ["zeroserve"] and [f.lower() for f in apply.query["force"]] == ["true"]
    assert apply.body == {**manifests[0], "metadata": {"name": "mlp", "namespace": "models"}}
    assert kube_stub.paths("GET")[0] == "/apis/serving.knative.dev/v1"  # discovery before anything is applied
    assert progress[0] == "applied Service mlp"
    assert progress[1].startswith("mlp: Ready=Unknown (RevisionMissing)")
    assert progress[-1] == "mlp: Ready=True"


def test_stub_deploy_inference_service_applies_cluster_runtime_first(kube_stub: KubeStub) -> None:
    options = RenderOptions(name="resnet", namespace="team")
    objs = deploy(connect(kube_stub), rendering.render(options, "kserve"), **FAST)

    assert [r.path for r in kube_stub.requests if r.method == "PATCH"] == [
        "/apis/serving.kserve.io/v1alpha1/clusterservingruntimes/zeroserve-onnx",  # cluster-scoped
        "/apis/serving.kserve.io/v1beta1/namespaces/team/inferenceservices/resnet",  # the manifest's namespace
    ]
    assert objs[1]["status"]["url"] == "http://resnet.team.example.com"
    assert "status" not in objs[0]  # the runtime is applied, not waited for


def test_stub_deploy_applies_the_storage_service_account_before_the_inference_service(kube_stub: KubeStub) -> None:
    options = RenderOptions(name="resnet", s3_secret="model-store")
    objs = deploy(connect(kube_stub), rendering.render(options, "kserve"), **FAST)

    assert kube_stub.paths("PATCH") == [
        "/apis/serving.kserve.io/v1alpha1/clusterservingruntimes/zeroserve-onnx",
        "/api/v1/namespaces/models/serviceaccounts/resnet-storage",  # the core group: /api/v1
        "/apis/serving.kserve.io/v1beta1/namespaces/models/inferenceservices/resnet",
    ]
    assert objs[1]["secrets"] == [{"name": "model-store"}]
    assert objs[2]["spec"]["predictor"]["serviceAccountName"] == "resnet-storage"
    assert "/api/v1" in [path.rstrip("/") for path in kube_stub.paths("GET")]  # discovered like the others


def test_stub_missing_knative_fails_before_applying_anything(kube_stub: KubeStub) -> None:
    kube_stub.groups = {}
    with pytest.raises(MissingAPIError, match=r"does not serve services\.serving\.knative\.dev/v1: install Knative"):
        deploy(connect(kube_stub), rendering.render(RenderOptions()), **FAST)
    assert kube_stub.paths("PATCH") == []


def test_stub_missing_kserve_applies_nothing_even_with_knative(kube_stub: KubeStub) -> None:
    kube_stub.groups = {"serving.knative.dev/v1": ["services", "revisions"]}
    with pytest.raises(MissingAPIError, match="install KServe"):
        deploy(connect(kube_stub), rendering.render(RenderOptions(), "kserve"), **FAST)
    assert kube_stub.paths("PATCH") == []


def test_stub_ready_false_that_stays_fails_with_the_controllers_message(kube_stub: KubeStub) -> None:
    kube_stub.final_ready, kube_stub.final_message = "False", "Container failed with: model not found"
    with pytest.raises(NotReadyError, match="Ready=False \\(RevisionFailed\\): Container failed with: model not"):
        deploy(connect(kube_stub), rendering.render(RenderOptions()), **FAST)


def test_stub_never_ready_times_out(kube_stub: KubeStub) -> None:
    kube_stub.reads_until_ready = 10**6
    with pytest.raises(ReadyTimeout, match="mlp not ready after 0 s: Ready=Unknown") as caught:
        deploy(connect(kube_stub), rendering.render(RenderOptions()), timeout=0.2, **FAST)
    assert isinstance(caught.value, TimeoutError)


def test_stub_reapply_waits_for_the_new_generation(kube_stub: KubeStub) -> None:
    cluster = connect(kube_stub)
    deploy(cluster, rendering.render(RenderOptions()), **FAST)
    # Re-deploying changed options: the stored status still says Ready=True for generation 1.
    [obj] = cluster_apply = [cluster.apply(m) for m in rendering.render(RenderOptions(max_scale=9))]
    assert cluster_apply[0]["metadata"]["generation"] == 2
    assert ready_condition(obj).status == "Unknown"  # stale Ready=True is not taken for the new spec
    [done] = deploy(cluster, rendering.render(RenderOptions(max_scale=9)), **FAST)
    assert done["status"]["observedGeneration"] == 2


def test_stub_forbidden_apply_names_rbac(kube_stub: KubeStub) -> None:
    kube_stub.forbid_patch = True
    with pytest.raises(DeployError, match=r"refused it \(403\).*cannot patch resource.*RBAC"):
        deploy(connect(kube_stub), rendering.render(RenderOptions()), **FAST)


def test_stub_status_reports_readiness_url_revision_and_scale(kube_stub: KubeStub) -> None:
    cluster = connect(kube_stub)
    deploy(cluster, rendering.render(RenderOptions()), **FAST)
    found = status(cluster, "mlp")
    assert found.lines() == [
        "Service mlp (namespace models)",
        "  ready     Ready=True",
        "  url       http://mlp.models.example.com",
        "  revision  mlp-00001",
        "  scale     1 pod(s) ready, 1 desired (min 0, max 4)",
    ]


def test_stub_status_of_an_inference_service(kube_stub: KubeStub) -> None:
    cluster = connect(kube_stub)
    deploy(cluster, rendering.render(RenderOptions(), "kserve"), **FAST)
    lines = status(cluster, "mlp", kserve=True).lines()
    assert lines[0] == "InferenceService mlp (namespace models)"
    assert lines[3] == "  revision  mlp-predictor-00001"
    assert lines[4] == "  scale     1 pod(s) ready, 1 desired (min 0, max 4)"


def test_stub_status_of_a_missing_service(kube_stub: KubeStub) -> None:
    with pytest.raises(NotFoundError, match="no service 'nope' in namespace models"):
        status(connect(kube_stub), "nope")


def test_stub_context_flag_picks_that_contexts_namespace(kube_stub: KubeStub) -> None:
    assert connect(kube_stub, context="other").namespace == "elsewhere"
    assert connect(kube_stub, context="other", namespace="mine").namespace == "mine"


def test_no_kubeconfig_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    with pytest.raises(NoClusterError, match="no Kubernetes cluster configured: .*nothing-here does not exist"):
        Cluster.connect(environ={"KUBECONFIG": str(missing)})


def test_unknown_context_is_a_clear_error(kube_stub: KubeStub) -> None:
    with pytest.raises(NoClusterError, match="cannot use the kubeconfig"):
        connect(kube_stub, context="no-such-context")


def test_unreachable_api_server_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on once this closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}")
    cluster = Cluster.connect(kubeconfig=str(kubeconfig), environ={})
    with pytest.raises(NoClusterError, match=f"cannot reach the Kubernetes API server at http://127.0.0.1:{port}"):
        deploy(cluster, rendering.render(RenderOptions()), **FAST)


def test_ready_timeout_follows_the_progress_deadline() -> None:
    gpu = rendering.render(RenderOptions(accelerator="gpu"))[0]
    assert ready_timeout(gpu) == RenderOptions(accelerator="gpu").budget.progress_deadline + 60
    isvc = rendering.render(RenderOptions(), "kserve")[1]
    assert ready_timeout(isvc) == RenderOptions().budget.progress_deadline + 60
    assert ready_timeout({"metadata": {}}) == 660  # Knative's default progress deadline, plus a minute


# -- the CLI ---------------------------------------------------------------------------------------------------


def test_stub_cli_deploy_prints_the_url(kube_stub: KubeStub, capsys: pytest.CaptureFixture[str]) -> None:
    kube_stub.reads_until_ready = 1  # the CLI polls every 2 s; be Ready on the first read
    code = cli.main(["deploy", "--kubeconfig", str(kube_stub.kubeconfig), "--name", "bert", "--max-scale", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == "http://bert.models.example.com\n"
    assert "applied Service bert" in err and "bert: Ready=True" in err
    [apply] = [r for r in kube_stub.requests if r.method == "PATCH"]
    assert apply.body["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/max-scale"] == "2"


def test_stub_cli_deploy_applies_the_repository_files(kube_stub: KubeStub, capsys: pytest.CaptureFixture[str]) -> None:
    kube_stub.reads_until_ready = 1
    files = ["-f", str(REPO / "knative/kserve/runtime.yaml"), "-f", str(REPO / "knative/kserve/isvc.yaml")]
    code = cli.main(["deploy", "--kubeconfig", str(kube_stub.kubeconfig), "-n", "ml", *files])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == "http://mlp-kserve.ml.example.com\n"
    bodies = [r.body for r in kube_stub.requests if r.method == "PATCH"]
    expected = rendering.render(RenderOptions(name="mlp-kserve", model_name="mlp"), "kserve")
    assert bodies[0] == expected[0]
    assert bodies[1] == {**expected[1], "metadata": {**expected[1]["metadata"], "namespace": "ml"}}


def test_stub_cli_status(kube_stub: KubeStub, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["deploy", "--kubeconfig", str(kube_stub.kubeconfig), "--no-wait"]) == 0
    capsys.readouterr()
    # Not Ready yet (the stub's controller has not seen it): status says so and exits 1.
    assert cli.main(["status", "mlp", "--kubeconfig", str(kube_stub.kubeconfig)]) == 1
    assert "Ready=Unknown (RevisionMissing)" in capsys.readouterr().out
    assert cli.main(["status", "mlp", "--kubeconfig", str(kube_stub.kubeconfig)]) == 0
    assert "url       http://mlp.models.example.com" in capsys.readouterr().out


def test_stub_cli_reports_missing_crds(kube_stub: KubeStub, capsys: pytest.CaptureFixture[str]) -> None:
    kube_stub.groups = {}
    assert cli.main(["deploy", "--kubeconfig", str(kube_stub.kubeconfig)]) == 1
    assert "zeroserve deploy: the cluster at http://127.0.0.1:" in capsys.readouterr().err


def test_cli_deploy_without_a_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["deploy", "--kubeconfig", str(tmp_path / "absent")]) == 1
    assert "zeroserve deploy: no Kubernetes cluster configured" in capsys.readouterr().err


def test_cli_deploy_rejects_files_and_render_options_together(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["deploy", "-f", "x.yaml", "--gpu"])
    assert exited.value.code == 2
    assert "either -f files or render options" in capsys.readouterr().err
