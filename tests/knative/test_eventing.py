"""``zeroserve render --eventing`` and knative/eventing: a Broker, the Triggers that deliver events to the model's
infer route with retries and a dead-letter sink, and a PingSource whose request the real server answers."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from zeroserve import cli, eventing
from zeroserve._yaml import to_yaml
from zeroserve.eventing import EventingOptions
from zeroserve.render_options import RenderOptions

from conftest import start_server

REPO = Path(__file__).resolve().parents[2]
VALIDATOR = REPO.parent / "shared" / "tools" / "validate-manifests"


def _by_kind(manifests: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for manifest in manifests:
        found.setdefault(manifest["kind"], []).append(manifest)
    return found


def test_the_trigger_delivers_its_event_type_to_the_infer_route_with_backoff_and_a_dead_letter_sink() -> None:
    [trigger, _] = eventing.triggers(RenderOptions(name="bert", model_name="bert-base"), EventingOptions())
    spec = trigger["spec"]
    assert spec["broker"] == "default"
    assert spec["filter"] == {"attributes": {"type": "io.kserve.inference.request"}}
    assert spec["subscriber"] == {
        "ref": {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": "bert"},
        "uri": "/v2/models/bert-base/infer",
    }
    assert spec["delivery"] == {
        "retry": 5,
        "backoffPolicy": "exponential",
        "backoffDelay": "PT0.5S",
        "timeout": "PT120S",  # one attempt may wait out a cold start (C + 60 s)
        "deadLetterSink": {"ref": {"apiVersion": "serving.knative.dev/v1", "kind": "Service",
                                   "name": "event-display"}},
    }


def test_the_ping_source_goes_through_the_broker_marked_for_the_second_trigger() -> None:
    options = RenderOptions()
    broker, _, ping_trigger, ping = eventing.render(options, EventingOptions(schedule="@hourly"))
    assert ping["spec"]["sink"] == {"ref": {"apiVersion": "eventing.knative.dev/v1", "kind": "Broker",
                                            "name": broker["metadata"]["name"]}}
    assert ping["spec"]["schedule"] == "@hourly" and ping["spec"]["contentType"] == "application/json"
    # A PingSource's events are typed dev.knative.sources.ping; the extension picks this model's.
    extensions = ping["spec"]["ceOverrides"]["extensions"]
    assert ping_trigger["spec"]["filter"]["attributes"] == {"type": "dev.knative.sources.ping", **extensions}
    assert extensions == {"targetmodel": "mlp"}
    assert ping_trigger["spec"]["subscriber"]["uri"] == "/v2/models/mlp/infer"


def test_kserve_events_go_to_the_inference_service_and_a_url_can_take_dead_letters() -> None:
    events = EventingOptions(broker="models", event_type="com.example.score", dead_letter_sink="https://dl.example/x",
                             retry=2)
    for trigger in eventing.triggers(RenderOptions(name="mlp-kserve", model_name="mlp"), events, kserve=True):
        spec = trigger["spec"]
        assert spec["subscriber"]["ref"] == {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
                                             "name": "mlp-kserve"}
        assert spec["broker"] == "models" and spec["delivery"]["retry"] == 2
        assert spec["delivery"]["deadLetterSink"] == {"uri": "https://dl.example/x"}
    assert eventing.triggers(RenderOptions(), events)[0]["spec"]["filter"]["attributes"]["type"] == "com.example.score"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"schedule": "@every 5m"}, "not a cron schedule"),
        ({"schedule": "*/5 * * *"}, "not a cron schedule"),
        ({"request": "{"}, "request is not JSON"),
        ({"request": '{"instances": [1]}'}, "non-empty 'inputs' list"),
        ({"broker": "Default"}, "not a valid Broker name"),
        ({"event_type": "a type"}, "without spaces"),
        ({"dead_letter_sink": "ftp://x"}, "neither an http"),
        ({"retry": -1}, "between 0 and 100"),
    ],
)
def test_bad_eventing_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EventingOptions(**options)


def test_render_eventing_prints_what_knative_eventing_holds(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["render", "--eventing"]) == 0
    printed = [doc for doc in yaml.safe_load_all(capsys.readouterr().out) if doc]
    folder = REPO / "knative" / "eventing"
    on_disk = [doc for name in ("broker.yaml", "trigger.yaml", "pingsource.yaml")
               for doc in yaml.safe_load_all((folder / name).read_text()) if doc]
    assert printed == on_disk
    assert yaml.safe_load((folder / "kustomization.yaml").read_text())["resources"] == [
        "broker.yaml", "trigger.yaml", "pingsource.yaml"]
    assert [m["kind"] for m in printed] == ["Broker", "Trigger", "Trigger", "PingSource"]


def test_render_eventing_flags_reach_the_manifests(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["render", "--eventing", "--kserve", "--name", "m", "-n", "ml", "--broker", "b", "--event-type", "x.y",
            "--schedule", "0 * * * *", "--request", '{"inputs": [{"name": "a"}]}', "--dead-letter-sink", "dls",
            "--retry", "3"]
    assert cli.main(args) == 0
    printed = [doc for doc in yaml.safe_load_all(capsys.readouterr().out) if doc]
    events = EventingOptions(broker="b", event_type="x.y", schedule="0 * * * *", request='{"inputs": [{"name": "a"}]}',
                             dead_letter_sink="dls", retry=3)
    assert printed == eventing.render(RenderOptions(name="m", namespace="ml"), events, kserve=True)
    with pytest.raises(SystemExit):
        cli.main(["render", "--eventing", "--schedule", "@every 1m"])
    assert "error: --schedule '@every 1m' is not a cron schedule" in capsys.readouterr().err


@pytest.mark.skipif(not VALIDATOR.exists(), reason=f"{VALIDATOR} not found (shared/ not beside the repo)")
@pytest.mark.parametrize("kserve", [False, True])
def test_eventing_manifests_validate_with_no_warnings(kserve: bool) -> None:
    events = EventingOptions(dead_letter_sink="https://dl.example/events", schedule="0 0 * * * *", retry=0)
    manifests = eventing.render(RenderOptions(name="b" * 63, namespace="ml"), events, kserve=kserve)
    result = subprocess.run([sys.executable, str(VALIDATOR), "-W", "-"], capture_output=True, text=True, timeout=120,
                            input=to_yaml(manifests))
    assert result.returncode == 0, result.stdout
    assert "4 document(s): 0 error(s), 0 warning(s), 0 skipped" in result.stdout


def test_the_ping_request_is_one_the_example_model_answers(tmp_path: Path) -> None:
    # The real server on the example model: the PingSource's data matches its metadata and, sent the way the
    # Broker delivers it (a binary-mode CloudEvent: ce-* headers, the data as the body), gets an answer.
    [ping] = _by_kind(eventing.render(RenderOptions(), EventingOptions()))["PingSource"]
    request = json.loads(ping["spec"]["data"])
    server = start_server(["--model_name", "mlp", "--model_dir", str(REPO / "examples" / "models" / "mlp")],
                          tmp_path / "server.log")
    try:
        metadata = httpx.get(f"{server.url}/v2/models/mlp", timeout=10).json()
        for tensor, declared in zip(request["inputs"], metadata["inputs"], strict=True):
            assert (tensor["name"], tensor["datatype"]) == (declared["name"], declared["datatype"])
            assert len(tensor["shape"]) == len(declared["shape"])
            assert all(d == -1 or d == s for d, s in zip(declared["shape"], tensor["shape"]))
        headers = {"ce-specversion": "1.0", "ce-id": str(uuid.uuid4()), "ce-type": "dev.knative.sources.ping",
                   "ce-source": "/apis/v1/namespaces/default/pingsources/mlp-ping", "ce-targetmodel": "mlp",
                   "content-type": ping["spec"]["contentType"]}
        answer = httpx.post(f"{server.url}/v2/models/mlp/infer", content=ping["spec"]["data"], headers=headers,
                            timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["shape"] == [1, 4]
    finally:
        server.stop()
