"""Model folder layouts understood without a config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from zeroserve.runtime.layout import ModelSource, discover
from zeroserve.runtime.server_errors import ModelLoadError


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_single_file(tmp_path: Path) -> None:
    model = touch(tmp_path / "resnet.onnx")
    assert discover(model, "m") == [ModelSource("m", "1", model)]


def test_kserve_folder_with_one_onnx(tmp_path: Path) -> None:
    model = touch(tmp_path / "whatever.onnx")
    touch(tmp_path / "README.md")
    assert discover(tmp_path, "m") == [ModelSource("m", "1", model)]


def test_several_onnx_files_prefer_model_onnx(tmp_path: Path) -> None:
    touch(tmp_path / "a.onnx")
    model = touch(tmp_path / "model.onnx")
    assert discover(tmp_path, "m") == [ModelSource("m", "1", model)]


def test_several_onnx_files_without_model_onnx_is_an_error(tmp_path: Path) -> None:
    touch(tmp_path / "a.onnx")
    touch(tmp_path / "b.onnx")
    with pytest.raises(ModelLoadError, match=r"several \.onnx files \(a\.onnx, b\.onnx\)"):
        discover(tmp_path, "m")


def test_version_folders_of_one_model(tmp_path: Path) -> None:
    v10 = touch(tmp_path / "10" / "model.onnx")
    v2 = touch(tmp_path / "2" / "model.onnx")
    assert discover(tmp_path, "m") == [ModelSource("m", "2", v2), ModelSource("m", "10", v10)]


def test_triton_repository(tmp_path: Path) -> None:
    a1 = touch(tmp_path / "alpha" / "1" / "model.onnx")
    b3 = touch(tmp_path / "beta" / "3" / "model.onnx")
    touch(tmp_path / "beta" / "config.pbtxt")
    touch(tmp_path / "notes" / "readme.txt")
    assert discover(tmp_path, "ignored") == [ModelSource("alpha", "1", a1), ModelSource("beta", "3", b3)]


def test_repository_of_unversioned_models(tmp_path: Path) -> None:
    tiny = touch(tmp_path / "tiny" / "model.onnx")
    image = touch(tmp_path / "image" / "resnet.onnx")
    assert discover(tmp_path, "ignored") == [ModelSource("image", "1", image), ModelSource("tiny", "1", tiny)]


def test_nothing_to_serve(tmp_path: Path) -> None:
    touch(tmp_path / "weights.bin")
    with pytest.raises(ModelLoadError, match="no ONNX model found"):
        discover(tmp_path, "m")


def test_not_an_onnx_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not an .onnx file"):
        discover(touch(tmp_path / "model.pt"), "m")
