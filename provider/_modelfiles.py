"""Read a model to seal: safetensors shards, the other files, the config (plumbing of
:mod:`provider.seal`).

The model folder is the provider's, but its files may come from anywhere (a hub download, a
colleague): pickles are refused (weights only through safetensors), symlinks may not leave the
folder, every safetensors header is checked, and an index must name exactly the tensors found.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from protocol.bundle import BundleLayout
from protocol.errors import MalformedBundle
from provider._safetensors import read_header
from provider.errors import InvalidModel

__all__ = ["PICKLE_SUFFIXES", "Plan", "Source", "plan_model"]

PICKLE_SUFFIXES: Final = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
CONFIG_NAME: Final = "config.json"
INDEX_SUFFIX: Final = ".safetensors.index.json"


@dataclass(frozen=True)
class Source:
    """Bytes ``[start, start + length)`` of ``path``: one tensor or one whole file."""

    path: Path
    start: int
    length: int


@dataclass(frozen=True)
class Plan:
    layout: BundleLayout
    sources: tuple[Source, ...]  # tensors then files, as in the layout
    model_config: dict[str, Any]


def plan_model(model: Path) -> Plan:
    """Plan the plaintext stream of ``model``: a ``.safetensors`` file, or a folder of shards
    and other files. Raises :class:`InvalidModel` naming the file and the rule."""
    if model.is_symlink() or not model.exists():
        raise InvalidModel(f"{model}: no such file or folder (or a symlink: name the target)")
    if model.is_file():
        _refuse_pickle(model, model.name)
        if model.suffix != ".safetensors":
            raise InvalidModel(f"{model.name}: expected a .safetensors file or a model folder")
        tensors, sources = _tensors([model])
        return Plan(_layout(tensors, []), tuple(sources), {})
    if not model.is_dir():
        raise InvalidModel(f"{model}: not a regular file or folder")
    root = model.resolve()
    shards: list[Path] = []
    files: list[tuple[str, Path]] = []
    for name, path in _walk(root):
        _refuse_pickle(path, name)
        if name.endswith(".safetensors"):
            shards.append(path)
        else:
            files.append((name, path))
    if not shards:
        raise InvalidModel(f"{model}: no .safetensors weights in the folder")
    tensors, sources = _tensors(shards)
    _check_index(root, files, {t[0]: s.path for t, s in zip(tensors, sources, strict=True)})
    file_plan = [(name, _size(path, name)) for name, path in files]
    sources += [
        Source(path, 0, size) for (_, path), (_, size) in zip(files, file_plan, strict=True)
    ]
    return Plan(_layout(tensors, file_plan), tuple(sources), _model_config(root))


def _layout(
    tensors: list[tuple[str, str, tuple[int, ...], int]], files: list[tuple[str, int]]
) -> BundleLayout:
    try:
        return BundleLayout.plan(tensors, files)
    except MalformedBundle as exc:
        raise InvalidModel(f"the model does not fit the bundle format: {exc}") from None


def _walk(root: Path) -> list[tuple[str, Path]]:
    """Every regular file under ``root`` as (relative POSIX name, path to read), sorted.
    Hidden entries (``.git``, ``.cache``) are skipped; symlinks may point inside the folder only."""
    found: list[tuple[str, Path]] = []
    for folder, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(folder)
        for dirname in list(dirnames):
            if dirname.startswith(".") or (base / dirname).is_symlink():
                dirnames.remove(dirname)
                if not dirname.startswith("."):
                    _check_link(root, base / dirname)
                    raise InvalidModel(
                        f"{(base / dirname).relative_to(root)}: symlinked folders are not "
                        "followed; copy the folder in"
                    )
        dirnames.sort()
        for filename in filenames:
            if filename.startswith("."):
                continue
            path = base / filename
            name = path.relative_to(root).as_posix()
            target = _check_link(root, path) if path.is_symlink() else path
            if not target.is_file():
                raise InvalidModel(f"{name}: not a regular file")
            found.append((name, target))
    return sorted(found)


def _check_link(root: Path, path: Path) -> Path:
    target = path.resolve()
    if not target.is_relative_to(root):
        raise InvalidModel(
            f"{path.relative_to(root)}: symlink leads out of the model folder (a Hugging Face "
            "cache snapshot? download with --local-dir, or copy the files)"
        )
    return target


def _refuse_pickle(path: Path, name: str) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InvalidModel(
            f"{name}: pickle weights ({path.suffix}) are refused: unpickling runs code. Weights "
            "only through safetensors (convert the checkpoint, then seal the .safetensors files)"
        )


def _tensors(
    shards: list[Path],
) -> tuple[list[tuple[str, str, tuple[int, ...], int]], list[Source]]:
    tensors: list[tuple[str, str, tuple[int, ...], int]] = []
    sources: list[Source] = []
    seen: dict[str, str] = {}
    for shard in sorted(shards):
        header = read_header(shard)
        for tensor in header.tensors:
            if tensor.name in seen:
                raise InvalidModel(
                    f"tensor {tensor.name!r} is in both {seen[tensor.name]} and {shard.name}"
                )
            seen[tensor.name] = shard.name
            tensors.append((tensor.name, tensor.dtype, tensor.shape, tensor.nbytes))
            sources.append(Source(shard, tensor.start, tensor.nbytes))
    return tensors, sources


def _check_index(root: Path, files: list[tuple[str, Path]], where: dict[str, Path]) -> None:
    """A ``*.safetensors.index.json`` must name exactly the tensors found, each in its shard."""
    for name, path in files:
        if not name.endswith(INDEX_SUFFIX):
            continue
        index = _read_json(path, name)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise InvalidModel(f"{name}: 'weight_map' must map tensor names to shard files")
        for tensor, shard in weight_map.items():
            actual = where.get(tensor)
            if actual is None or not isinstance(shard, str):
                raise InvalidModel(f"{name}: tensor {tensor!r} is in no shard of the folder")
            if (path.parent / shard).resolve() != actual.resolve():
                raise InvalidModel(f"{name}: tensor {tensor!r} is not in {shard!r}")
        missing = sorted(set(where) - set(weight_map))
        if missing:
            raise InvalidModel(f"{name}: {len(missing)} tensors are missing, e.g. {missing[0]!r}")


def _model_config(root: Path) -> dict[str, Any]:
    path = root / CONFIG_NAME
    return _read_json(path, CONFIG_NAME) if path.is_file() else {}


def _read_json(path: Path, name: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_bytes(), parse_constant=_no_constant)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidModel(f"{name}: not a readable JSON file ({type(exc).__name__})") from None
    if not isinstance(value, dict):
        raise InvalidModel(f"{name}: not a JSON object")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _size(path: Path, name: str) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise InvalidModel(f"{name}: cannot read ({exc.strerror or exc})") from None
