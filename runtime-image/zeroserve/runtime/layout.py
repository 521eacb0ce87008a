"""Find the ONNX models in a local model folder.

Three layouts are understood, so that no config file is needed:

- a single ``.onnx`` file, served as ``model_name`` version 1;
- a folder holding one ``.onnx`` (KServe's layout), likewise;
- a Triton-style repository: ``VERSION/model.onnx`` folders for ``model_name``, or
  ``NAME/VERSION/model.onnx`` for several models, each version served at ``/versions/VERSION``
  (``NAME/model.onnx`` is that model's version 1).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from zeroserve.runtime.server_errors import ModelLoadError


@dataclass(frozen=True, slots=True)
class ModelSource:
    name: str
    version: str
    path: Path


def discover(root: Path, model_name: str) -> list[ModelSource]:
    if root.is_file():
        if root.suffix != ".onnx":
            raise ModelLoadError(f"model file '{root}' is not an .onnx file")
        return [ModelSource(model_name, "1", root)]
    if not root.is_dir():
        raise ModelLoadError(f"model path '{root}' does not exist")

    single = _onnx_in(root)
    if single is not None:
        return [ModelSource(model_name, "1", single)]

    versions = _versions(root)
    if versions:
        return [ModelSource(model_name, version, path) for version, path in versions]

    sources = [
        ModelSource(child.name, version, path)
        for child in sorted(root.iterdir())
        if child.is_dir() and not child.name.startswith(".")
        for version, path in _versions(child) or _unversioned(child)
    ]
    if not sources:
        raise ModelLoadError(
            f"no ONNX model found in '{root}': expected a .onnx file, a folder holding one, "
            "or a repository laid out as NAME/VERSION/model.onnx"
        )
    return sources


def _onnx_in(folder: Path) -> Path | None:
    """The one .onnx file directly in ``folder`` (model.onnx wins when there are several)."""
    found = sorted(path for path in folder.glob("*.onnx") if path.is_file())
    if not found:
        return None
    if len(found) == 1:
        return found[0]
    preferred = folder / "model.onnx"
    if preferred in found:
        return preferred
    names = ", ".join(path.name for path in found)
    raise ModelLoadError(f"'{folder}' holds several .onnx files ({names}); name one or call it model.onnx")


def _unversioned(folder: Path) -> list[tuple[str, Path]]:
    """``NAME/model.onnx`` in a repository: the model's only version, 1."""
    onnx_file = _onnx_in(folder)
    return [("1", onnx_file)] if onnx_file is not None else []


def _versions(folder: Path) -> list[tuple[str, Path]]:
    """Numeric version folders of one model, each with its .onnx, in ascending version order."""
    versions: list[tuple[int, str, Path]] = []
    for child in folder.iterdir():
        if child.is_dir() and child.name.isdigit():
            onnx_file = _onnx_in(child)
            if onnx_file is not None:
                versions.append((int(child.name), child.name, onnx_file))
    return [(name, path) for _, name, path in sorted(versions)]


@dataclass(frozen=True, slots=True)
class ListedModel:
    """A model found in a remote repository's listing: its folder (to fetch) and its file within it."""

    name: str
    version: str
    folder: str  # relative to the repository: NAME/VERSION or NAME
    file: str  # the .onnx file, relative to ``folder``
    size_bytes: int  # every file in ``folder`` (external weights included)


def discover_listing(files: Iterable[tuple[str, int]]) -> list[ListedModel]:
    """The models of a ``NAME/VERSION/model.onnx`` or ``NAME/model.onnx`` repository, from a listing of its
    files (relative path, size), by the rules ``discover`` applies to a local folder."""
    folders: dict[str, dict[str, int]] = {}
    for rel, size in files:
        parts = rel.split("/")
        if len(parts) in (2, 3) and not any(part.startswith(".") for part in parts):
            folders.setdefault("/".join(parts[:-1]), {})[parts[-1]] = size
    found: dict[str, list[ListedModel]] = {}
    for folder, names in sorted(folders.items()):
        onnx = sorted(name for name in names if name.endswith(".onnx"))
        if not onnx:
            continue
        if len(onnx) > 1 and "model.onnx" not in onnx:
            raise ModelLoadError(f"'{folder}' holds several .onnx files ({', '.join(onnx)}); call one model.onnx")
        chosen = onnx[0] if len(onnx) == 1 else "model.onnx"
        name, _, version = folder.partition("/")
        if version and not version.isdigit():
            continue  # not a version folder: NAME/other/... is no model of this layout
        found.setdefault(name, []).append(ListedModel(name, version or "1", folder, chosen, sum(names.values())))
    models = [model for name in sorted(found) for model in sorted(found[name], key=lambda m: int(m.version))]
    if not models:
        raise ModelLoadError(
            "no ONNX model found in the repository: expected NAME/VERSION/model.onnx or NAME/model.onnx"
        )
    return models
