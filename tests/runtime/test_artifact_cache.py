"""The artifact cache (``--cache_uri``) against real parts: ONNX Runtime sessions, the local disk, moto S3
in a subprocess, real server processes. Keys and TensorRT/CUDA options are checked as data, without a GPU."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from zeroserve.runtime import digests
from zeroserve.runtime.artifact_cache import ArtifactStore
from zeroserve.runtime.artifact_keys import GpuFacts, artifact_key, cpu_features, detect_gpu, key_fields
from zeroserve.runtime.digests import DigestMemo
from zeroserve.runtime.model import OnnxModel
from zeroserve.runtime.providers import CPU, CUDA, TRT, create_session, select_providers
from zeroserve.runtime.server_errors import StorageError
from zeroserve.runtime.session_artifacts import OPTIMIZED_NAME, SessionArtifacts
from zeroserve.runtime.settings import ProviderSettings

import models
from conftest import start_server

H100 = GpuFacts(name="NVIDIA H100 80GB HBM3", compute_capability="9.0", cuda_runtime="13.0", tensorrt="10.14.1")
ALL_PROVIDERS = [TRT, CUDA, CPU]
FEED = {"input": np.arange(32, dtype=np.float32).reshape(2, 16) / 32}


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return models.mlp_model(tmp_path / "model" / "model.onnx")


def load(model_path: Path, store: ArtifactStore) -> OnnxModel:
    """What the loader does for one model: load, then warm up (which publishes a TensorRT build)."""
    model = OnnxModel("mlp", "1", model_path, ProviderSettings(choice="cpu"), artifacts=store)
    model.load()
    model.warmup()
    return model


def source(model: OnnxModel) -> str:
    assert model.session_artifacts is not None and model.session_artifacts.lookup is not None
    return model.session_artifacts.lookup.source


def entry_dirs(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.is_dir() and (p / "manifest.json").exists()]


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))


# --- keys and provider options, as data: these run without a GPU -------------------------------------


def trt_fields(settings: ProviderSettings, gpu: GpuFacts | None = H100, **overrides: Any) -> dict[str, Any] | None:
    provider, options = select_providers(settings, ALL_PROVIDERS)[0]
    assert provider == TRT
    given: dict[str, Any] = {"model_sha256": "a" * 64, "model_file": "model.onnx", "ort_version": "1.31.1"}
    return key_fields(TRT, options, gpu=gpu, machine="x86_64", **(given | overrides))


def cpu_fields(**given: Any) -> dict[str, Any]:
    base = {"model_sha256": "a" * 64, "model_file": "m.onnx", "ort_version": "1.32.0"}
    fields = key_fields(CPU, {}, **(base | given))
    assert fields is not None
    return fields


def test_cpu_key_fields() -> None:
    fields = cpu_fields(cpu_flags=["avx2", "fma"])
    assert fields["kind"] == "ort-optimized" and fields["provider"] == CPU and "gpu" not in fields
    assert fields["optimization_level"] == "ALL" and fields["cpu_flags"] == ["avx2", "fma"]
    # An EXTENDED graph holds on any CPU of the architecture: the flags are not keyed.
    assert "cpu_flags" not in cpu_fields(cpu_level="EXTENDED")
    assert cpu_fields(cpu_level="EXTENDED", machine="aarch64") != cpu_fields(cpu_level="EXTENDED", machine="x86_64")


def test_cpu_key_changes_with_the_vector_unit() -> None:
    # An ALL graph's NCHWc blocks are 8 floats wide on AVX2 and 16 on AVX-512.
    avx2, avx512 = cpu_fields(cpu_flags=["avx", "avx2", "fma"]), cpu_fields(cpu_flags=["avx", "avx2", "avx512f", "fma"])
    assert artifact_key(avx2) != artifact_key(avx512)


def test_cpu_features_from_cpuinfo() -> None:
    x86 = "processor\t: 0\nflags\t\t: fpu sse4_1 sse4_2 avx avx2 fma ht avx512f avx512_vnni pdpe1gb\n"
    assert cpu_features(x86) == ["avx", "avx2", "avx512_vnni", "avx512f", "fma", "sse4_1", "sse4_2"]
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes asimddp sve i8mm\n"
    assert cpu_features(arm) == ["asimd", "asimddp", "i8mm", "sve"]
    assert cpu_features("") == []


def test_digest_memo_skips_unchanged_files_and_sees_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(digests, "_RACY_NS", 0)  # no 2 s wait; the sleeps below outlast a timestamp tick
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 1000)
    time.sleep(0.05)
    memo, calls = DigestMemo(tmp_path / "memo"), []

    def compute() -> str:
        calls.append(1)
        return digests.sha256_file(path)

    first = memo.combined([path], compute, "t")
    assert memo.combined([path], compute, "t") == first and len(calls) == 1
    flip_bytes(path)
    time.sleep(0.05)
    assert memo.combined([path], compute, "t") != first and len(calls) == 2


def test_digest_memo_does_not_trust_a_fresh_file(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"x")
    memo = DigestMemo(tmp_path / "memo")
    memo.sha256(path)
    assert not (tmp_path / "memo").exists()


def test_cuda_has_no_artifact_without_gpu() -> None:
    options = select_providers(ProviderSettings(choice="cuda"), ALL_PROVIDERS)[0][1]
    assert key_fields(CUDA, options, model_sha256="a" * 64, model_file="m.onnx", ort_version="1", gpu=H100) is None


def test_tensorrt_key_needs_gpu_facts_without_gpu() -> None:
    assert trt_fields(ProviderSettings(choice="tensorrt"), gpu=None) is None


def test_tensorrt_key_fields_without_gpu() -> None:
    settings = ProviderSettings(
        choice="tensorrt", trt_fp16=True, trt_builder_optimization_level=2,
        trt_profile_min_shapes="input:1x16", trt_profile_opt_shapes="input:4x16", trt_profile_max_shapes="input:8x16",
    )  # fmt: skip
    fields = trt_fields(settings)
    assert fields is not None
    assert fields["kind"] == "tensorrt" and fields["precision"] == "fp16"
    assert fields["profile_shapes"] == ["input:1x16", "input:4x16", "input:8x16"]
    assert fields["optimization_level"] == "2"
    assert fields["gpu"] == {
        "name": H100.name, "compute_capability": "9.0", "cuda_runtime": "13.0", "tensorrt": "10.14.1"
    }  # fmt: skip


def test_tensorrt_key_ignores_where_files_go_without_gpu() -> None:
    a = trt_fields(ProviderSettings(choice="tensorrt", device_id=0, trt_engine_cache_path="/a"))
    b = trt_fields(ProviderSettings(choice="tensorrt", device_id=1, trt_timing_cache_path="/b"))
    assert a is not None and b is not None and artifact_key(a) == artifact_key(b)


@pytest.mark.parametrize(
    "change",
    [
        {"settings": ProviderSettings(choice="tensorrt", trt_fp16=True)},
        {"settings": ProviderSettings(choice="tensorrt", trt_max_workspace_size=2**30)},
        {"settings": ProviderSettings(choice="tensorrt", trt_builder_optimization_level=5)},
        {"settings": ProviderSettings(
            choice="tensorrt", trt_profile_min_shapes="input:1x16", trt_profile_opt_shapes="input:1x16",
            trt_profile_max_shapes="input:1x16",
        )},  # fmt: skip
        {"gpu": GpuFacts("NVIDIA L4", "8.9", "13.0", "10.14.1")},
        {"gpu": GpuFacts("NVIDIA H100 PCIe", "9.0", "13.0", "10.14.1")},  # same CC, other card
        {"gpu": GpuFacts(H100.name, "9.0", "12.8", "10.14.1")},
        {"gpu": GpuFacts(H100.name, "9.0", "13.0", "10.16.1")},
        {"model_sha256": "b" * 64},  # retrained weights, same file name: ORT's own engine name stays the same
        {"model_file": "other.onnx"},
        {"ort_version": "1.30.0"},
    ],
    ids=lambda change: "-".join(change),
)
def test_tensorrt_key_changes_with_what_makes_an_engine_without_gpu(change: dict[str, Any]) -> None:
    base = trt_fields(ProviderSettings(choice="tensorrt"))
    changed = trt_fields(change.pop("settings", ProviderSettings(choice="tensorrt")), **change)
    assert base is not None and changed is not None
    assert artifact_key(base) != artifact_key(changed)


def test_tensorrt_session_points_engine_and_timing_caches_at_the_entry_without_gpu(
    model_path: Path, tmp_path: Path
) -> None:
    settings = ProviderSettings(choice="tensorrt", trt_fp16=True, trt_engine_cache_path="/elsewhere")
    names_options = select_providers(settings, ALL_PROVIDERS)
    cache = SessionArtifacts(ArtifactStore(str(tmp_path / "store"), tmp_path / "cache"), model_path, gpu=H100)
    import onnxruntime as ort

    prepared = cache.prepare([n for n, _ in names_options], names_options[0][1], ort.SessionOptions())
    assert prepared is not None and cache.lookup is not None and not cache.lookup.hit
    folder = str(cache.lookup.files)
    assert folder.startswith(str(tmp_path / "store" / cache.lookup.key))
    assert prepared.options["trt_engine_cache_enable"] == prepared.options["trt_timing_cache_enable"] == "True"
    assert prepared.options["trt_engine_cache_path"] == prepared.options["trt_timing_cache_path"] == folder
    assert prepared.options["trt_fp16_enable"] == "True" and prepared.model_path == model_path


def test_ep_context_entries_are_keyed_apart_without_gpu() -> None:
    settings = ProviderSettings(choice="tensorrt")
    engines, contexts = trt_fields(settings), trt_fields(settings, trt_ep_context=True)
    assert engines is not None and contexts is not None
    assert "artifact" not in engines and contexts["artifact"] == "ep-context"
    assert artifact_key(engines) != artifact_key(contexts)


def prepare_trt(model_path: Path, store: ArtifactStore, **settings: Any) -> tuple[SessionArtifacts, Any, Any]:
    import onnxruntime as ort

    names_options = select_providers(ProviderSettings(choice="tensorrt", **settings), ALL_PROVIDERS)
    cache = SessionArtifacts(store, model_path, gpu=H100, trt_ep_context=True)
    so = ort.SessionOptions()
    prepared = cache.prepare([n for n, _ in names_options], names_options[0][1], so)
    assert prepared is not None and cache.lookup is not None
    return cache, prepared, so


def test_ep_context_miss_asks_tensorrt_for_the_context_model_without_gpu(model_path: Path, tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"), tmp_path / "cache")
    cache, prepared, _ = prepare_trt(model_path, store, trt_fp16=True)
    assert cache.lookup is not None and not cache.lookup.hit
    folder = str(cache.lookup.files)
    assert prepared.model_path == model_path
    assert prepared.options["trt_dump_ep_context_model"] == "True"
    assert prepared.options["trt_ep_context_file_path"] == prepared.options["trt_engine_cache_path"] == folder
    assert prepared.options["trt_ep_context_embed_mode"] == "0"  # the engine beside it, named relatively


def test_ep_context_hit_loads_the_context_model_without_gpu(model_path: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    store = ArtifactStore(str(tmp_path / "store"), tmp_path / "cache")
    first, _, _ = prepare_trt(model_path, store)
    assert first.lookup is not None
    # What the TensorRT EP writes into the build folder (no GPU here: stand-in bytes, same names).
    context_name = f"{model_path.stem}_ctx.onnx"
    (first.lookup.files / context_name).write_bytes(b"EPContext model")
    (first.lookup.files / "TensorrtExecutionProvider_TRTKernel_graph_main_1_0_0_sm90.engine").write_bytes(b"plan")
    first.created([TRT, CUDA, CPU])
    first.publish()
    assert first.published

    second, prepared, so = prepare_trt(model_path, store)
    assert second.lookup is not None and second.lookup.hit
    assert prepared.model_path == second.lookup.files / context_name
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert "trt_dump_ep_context_model" not in prepared.options  # never writes into a verified entry's model


def test_ep_context_entry_without_context_model_serves_as_engine_cache_without_gpu(
    model_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = ArtifactStore(str(tmp_path / "store"), tmp_path / "cache")
    first, _, _ = prepare_trt(model_path, store)
    assert first.lookup is not None
    (first.lookup.files / "TensorrtExecutionProvider_TRTKernel_graph_main_1_0_0_sm90.engine").write_bytes(b"plan")
    first.created([TRT, CUDA, CPU])
    first.publish()
    assert "wrote no EP-context model" in caplog.text

    second, prepared, _ = prepare_trt(model_path, store)
    assert second.lookup is not None and second.lookup.hit
    assert prepared.model_path == model_path
    assert prepared.options["trt_engine_cache_path"] == str(second.lookup.files)


@pytest.mark.parametrize("providers", [[CUDA, CPU], [TRT, CUDA, CPU]])
def test_gpu_sessions_get_no_cpu_graph_without_gpu(model_path: Path, tmp_path: Path, providers: list[str]) -> None:
    # An optimized graph is only valid for the providers it was made with; TensorRT without GPU facts is not keyed.
    import onnxruntime as ort

    cache = SessionArtifacts(ArtifactStore(str(tmp_path / "store"), tmp_path / "cache"), model_path)
    assert cache.prepare(providers, {}, ort.SessionOptions()) is None
    assert cache.lookup is None


def test_detect_gpu_is_none_without_gpu() -> None:
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        assert detect_gpu(0) is None
    else:
        pytest.skip("a CUDA driver is installed here")


def test_unsupported_cache_uri(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="unsupported scheme 'ftp'"):
        ArtifactStore("ftp://host/x", tmp_path)


# --- a local folder ------------------------------------------------------------------------------------


def test_second_load_is_a_local_hit(model_path: Path, tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"), tmp_path / "cache")
    first = load(model_path, store)
    assert source(first) == "miss"
    [entry] = entry_dirs(tmp_path / "store")
    assert (entry / "files" / OPTIMIZED_NAME).is_file()
    assert not list(entry.glob(".build-*")), "the build folder is moved into the entry"

    second = load(model_path, ArtifactStore(f"file://{tmp_path / 'store'}", tmp_path / "cache"))
    assert source(second) == "local"
    np.testing.assert_allclose(first.run(FEED, None)[0], second.run(FEED, None)[0], rtol=1e-6)


def test_changed_model_is_another_entry(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"), tmp_path / "cache")
    path = models.mlp_model(tmp_path / "model" / "model.onnx", seed=1)
    load(path, store)
    models.mlp_model(path, seed=2)  # same file name and graph, other weights
    assert source(load(path, store)) == "miss"
    assert len(entry_dirs(tmp_path / "store")) == 2


def _flip(entry: Path) -> None:
    flip_bytes(entry / "files" / OPTIMIZED_NAME)


def _truncate(entry: Path) -> None:
    path = entry / "files" / OPTIMIZED_NAME
    path.write_bytes(path.read_bytes()[:100])


def _other_fields(entry: Path) -> None:
    doc = json.loads((entry / "manifest.json").read_text())
    doc["fields"]["onnxruntime"] = "0.0.1"
    (entry / "manifest.json").write_text(json.dumps(doc))


def _escaping_name(entry: Path) -> None:
    doc = json.loads((entry / "manifest.json").read_text())
    doc["files"]["../../evil.onnx"] = doc["files"].pop(OPTIMIZED_NAME)
    (entry / "manifest.json").write_text(json.dumps(doc))


def _no_manifest(entry: Path) -> None:
    (entry / "manifest.json").unlink()


@pytest.mark.parametrize("damage", [_flip, _truncate, _other_fields, _escaping_name, _no_manifest])
def test_damaged_local_entry_is_rejected_and_rebuilt(
    model_path: Path, tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    store = ArtifactStore(str(tmp_path / "store"), tmp_path / "cache")
    expected = load(model_path, store).run(FEED, None)[0]
    [entry] = entry_dirs(tmp_path / "store")
    good = (entry / "files" / OPTIMIZED_NAME).read_bytes()
    damage(entry)

    rebuilt = load(model_path, store)
    assert source(rebuilt) == "miss"
    np.testing.assert_allclose(rebuilt.run(FEED, None)[0], expected, rtol=1e-6)
    assert (entry / "files" / OPTIMIZED_NAME).read_bytes() == good
    assert source(load(model_path, store)) == "local"


def test_entry_onnxruntime_cannot_load_is_bypassed(
    model_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A manifest rewritten to match garbage passes the checksums; ORT then refuses the file and the
    # session is built from the model itself.
    store = ArtifactStore(str(tmp_path / "store"), tmp_path / "cache")
    load(model_path, store)
    [entry] = entry_dirs(tmp_path / "store")
    (entry / "files" / OPTIMIZED_NAME).write_bytes(b"not a model")
    doc = json.loads((entry / "manifest.json").read_text())
    doc["files"][OPTIMIZED_NAME] = {"size": 11, "sha256": __import__("hashlib").sha256(b"not a model").hexdigest()}
    (entry / "manifest.json").write_text(json.dumps(doc))

    with caplog.at_level(logging.WARNING, logger="zeroserve.runtime.providers"):
        model = load(model_path, store)
    assert "building without it" in caplog.text
    assert model.run(FEED, None)[0].shape == (2, 4)


def test_stale_files_beside_a_valid_entry_are_removed(model_path: Path, tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"), tmp_path / "cache")
    load(model_path, store)
    [entry] = entry_dirs(tmp_path / "store")
    stray = entry / "files" / "TensorrtExecutionProvider_TRTKernel_graph_x_0_0_sm90.engine"
    stray.write_bytes(b"unverified")
    assert source(load(model_path, store)) == "local"
    assert not stray.exists()


def test_session_from_the_cached_graph_runs_with_optimizations_off(model_path: Path, tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"), tmp_path / "cache")
    cache = SessionArtifacts(store, model_path)
    create_session(model_path, ProviderSettings(choice="cpu"), artifacts=cache)
    assert cache.published and cache.lookup is not None
    cache = SessionArtifacts(store, model_path)
    session, in_use = create_session(model_path, ProviderSettings(choice="cpu"), artifacts=cache)
    assert cache.lookup is not None and cache.lookup.source == "local" and in_use == [CPU]
    assert session._model_path.endswith(OPTIMIZED_NAME)


# --- S3 (moto) -----------------------------------------------------------------------------------------


def remote_keys(s3: Any, bucket: str) -> list[str]:
    listing = s3.client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return sorted(item["Key"] for item in listing)


def test_s3_entry_is_shared_by_a_fresh_start(s3_env: Any, model_path: Path, tmp_path: Path) -> None:
    bucket = s3_env.create_bucket()
    uri = f"s3://{bucket}/artifacts"
    first_store = ArtifactStore(uri, tmp_path / "pod1")
    assert source(load(model_path, first_store)) == "miss"
    assert first_store.wait(30)
    keys = remote_keys(s3_env, bucket)
    [key] = {k.split("/")[1] for k in keys}
    assert keys == [f"artifacts/{key}/files/{OPTIMIZED_NAME}", f"artifacts/{key}/manifest.json"]

    # Another pod, empty local cache: the entry comes from S3, and nothing is uploaded again.
    puts = sum(r.method == "PUT" for r in s3_env.requests())
    assert source(load(model_path, ArtifactStore(uri, tmp_path / "pod2"))) == "remote"
    assert f"artifacts/{key}/files/{OPTIMIZED_NAME}" in s3_env.object_reads(bucket)
    assert sum(r.method == "PUT" for r in s3_env.requests()) == puts

    # Its next start is local: S3 is not even asked.
    before = len(s3_env.requests())
    assert source(load(model_path, ArtifactStore(uri, tmp_path / "pod2"))) == "local"
    assert len(s3_env.requests()) == before


def test_s3_tampered_entry_is_rejected_and_replaced(s3_env: Any, model_path: Path, tmp_path: Path) -> None:
    bucket = s3_env.create_bucket()
    uri = f"s3://{bucket}/artifacts"
    store = ArtifactStore(uri, tmp_path / "pod1")
    load(model_path, store)
    assert store.wait(30)
    [artifact] = [k for k in remote_keys(s3_env, bucket) if k.endswith(OPTIMIZED_NAME)]
    good = s3_env.client.get_object(Bucket=bucket, Key=artifact)["Body"].read()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    s3_env.put(bucket, artifact, bytes(bad))

    store = ArtifactStore(uri, tmp_path / "pod2")
    assert source(load(model_path, store)) == "miss"
    assert store.wait(30)
    assert s3_env.client.get_object(Bucket=bucket, Key=artifact)["Body"].read() == good


def test_s3_upload_failure_does_not_fail_the_load(
    s3_env: Any, model_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = ArtifactStore("s3://no-such-bucket-zeroserve/artifacts", tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="zeroserve.runtime.artifact_cache"):
        model = load(model_path, store)
        assert store.wait(30)
    assert source(model) == "miss" and model.run(FEED, None)[0].shape == (2, 4)
    assert "upload of" in caplog.text and "failed" in caplog.text
    # The local entry still serves this machine's next start.
    assert source(load(model_path, store)) == "local"


# --- real server processes -----------------------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def test_server_second_start_is_a_cache_hit(model_path: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    args = ["--model_dir", str(model_path.parent), "--cache_dir", str(tmp_path / "cache")]
    server = start_server([*args, "--cache_uri", str(store)], tmp_path / "first.log")
    server.stop()
    assert "artifact cache miss" in server.log() and "stored ort-optimized" in server.log()

    server = start_server(args, tmp_path / "second.log", env={"ZEROSERVE_CACHE_URI": str(store)})
    server.stop()
    assert "artifact cache hit" in server.log() and "(local, key" in server.log()


def test_server_fresh_start_from_s3_is_a_cache_hit(s3_env: Any, model_path: Path, tmp_path: Path) -> None:
    bucket = s3_env.create_bucket()
    args = ["--model_dir", str(model_path.parent), "--cache_uri", f"s3://{bucket}/zs"]
    server = start_server([*args, "--cache_dir", str(tmp_path / "pod1")], tmp_path / "first.log")
    try:
        wait_for(lambda: any(k.endswith("manifest.json") for k in remote_keys(s3_env, bucket)))
    finally:
        server.stop()
    assert "artifact cache miss" in server.log()

    server = start_server([*args, "--cache_dir", str(tmp_path / "pod2")], tmp_path / "second.log")
    server.stop()
    assert "artifact cache hit" in server.log() and "(remote, key" in server.log()
    assert any(k.endswith(OPTIMIZED_NAME) for k in s3_env.object_reads(bucket))


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        ([], {}, None),  # off by default
        ([], {"ZEROSERVE_CACHE_URI": "s3://b/p"}, "s3://b/p"),
        (["--cache_uri", "/var/cache/zs"], {"ZEROSERVE_CACHE_URI": "s3://b/p"}, "/var/cache/zs"),
    ],
)
def test_cache_uri_flag_and_environment(argv: list[str], environ: dict[str, str], expected: str | None) -> None:
    from zeroserve.runtime.config import RuntimeConfig

    assert RuntimeConfig.from_args(argv, environ).cache_uri == expected
