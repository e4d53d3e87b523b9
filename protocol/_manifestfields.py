"""Field rules of the sealed-bundle manifest (plumbing of :mod:`protocol.bundle`).

Every check raises :class:`MalformedBundle` naming the field and the rule; values come from the
untrusted parent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from protocol.errors import MalformedBundle

ALIGNMENT: Final = 64
MAX_NAME: Final = 1024
MAX_DIMS: Final = 16
MAX_CONTEXT_CHARS: Final = 8192  # KMS: the encryption context's keys and values together
CONTEXT_MODEL: Final = "nci:model"
CONTEXT_BUNDLE: Final = "nci:bundle"
_TENSOR_KEYS: Final = frozenset({"name", "dtype", "shape", "offset", "length"})
_FILE_KEYS: Final = frozenset({"name", "offset", "length"})
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")

# safetensors dtype names → item size in bytes (safetensors/src/tensor.rs ``Dtype``)
DTYPE_SIZES: Final[Mapping[str, int]] = MappingProxyType(
    {
        "BOOL": 1,
        "U8": 1,
        "I8": 1,
        "I16": 2,
        "F16": 2,
        "BF16": 2,
        "I32": 4,
        "F32": 4,
        "I64": 8,
        "F64": 8,
    }
)


def align_up(value: int) -> int:
    """The next multiple of :data:`ALIGNMENT` at or after ``value``."""
    return -(-value // ALIGNMENT) * ALIGNMENT


@dataclass(frozen=True)
class TensorEntry:
    """One tensor in the plaintext stream: ``length`` bytes at ``offset``, row-major."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int


@dataclass(frozen=True)
class FileEntry:
    """One non-tensor file (config, tokenizer) in the plaintext stream; ``name`` is relative."""

    name: str
    offset: int
    length: int


# -- field rules ---------------------------------------------------------------------------------


def uint(container: Mapping[str, Any], key: str, where: str = "manifest") -> int:
    value = container[key]
    if type(value) is not int or value < 0:
        raise MalformedBundle(f"{where}.{key} must be an unsigned integer")
    return value


def check_context(value: object, model_id: str, bundle_id: bytes) -> dict[str, str]:
    if type(value) is not dict:
        raise MalformedBundle("manifest.encryption_context must be a map of text to text")
    chars = 0
    for key, item in value.items():
        if type(item) is not str or not key:
            raise MalformedBundle("manifest.encryption_context must map non-empty text to text")
        chars += len(key) + len(item)
    if chars > MAX_CONTEXT_CHARS:
        raise MalformedBundle(
            f"manifest.encryption_context has {chars} characters; KMS allows {MAX_CONTEXT_CHARS}"
        )
    if value.get(CONTEXT_MODEL) != model_id:
        raise MalformedBundle(f"manifest.encryption_context[{CONTEXT_MODEL!r}] must be model_id")
    if value.get(CONTEXT_BUNDLE) != bundle_id.hex():
        raise MalformedBundle(
            f"manifest.encryption_context[{CONTEXT_BUNDLE!r}] must be bundle_id in hex"
        )
    return dict(value)


def _entries(value: object, field: str, keys: frozenset[str]) -> list[dict[str, Any]]:
    if type(value) is not list:
        raise MalformedBundle(f"manifest.{field} must be an array")
    for index, item in enumerate(value):
        if type(item) is not dict or set(item) != keys:
            raise MalformedBundle(f"manifest.{field}[{index}] must be a map of {sorted(keys)}")
    return value


def parse_tensors(value: object) -> tuple[TensorEntry, ...]:
    out: list[TensorEntry] = []
    for index, item in enumerate(_entries(value, "tensors", _TENSOR_KEYS)):
        where = f"manifest.tensors[{index}]"
        name, dtype, shape = item["name"], item["dtype"], item["shape"]
        if type(name) is not str or not 1 <= len(name) <= MAX_NAME:
            raise MalformedBundle(f"{where}.name must be 1..{MAX_NAME} characters")
        if type(shape) is not list or len(shape) > MAX_DIMS:
            raise MalformedBundle(f"{where}.shape must be an array of at most {MAX_DIMS} uints")
        dims = tuple(uint({"dim": d}, "dim", f"{where}.shape") for d in shape)
        out.append(
            TensorEntry(name, dtype, dims, uint(item, "offset", where), uint(item, "length", where))
        )
    return tuple(out)


def parse_files(value: object) -> tuple[FileEntry, ...]:
    out: list[FileEntry] = []
    for index, item in enumerate(_entries(value, "files", _FILE_KEYS)):
        where = f"manifest.files[{index}]"
        name = item["name"]
        if type(name) is not str:
            raise MalformedBundle(f"{where}.name must be text")
        out.append(FileEntry(name, uint(item, "offset", where), uint(item, "length", where)))
    return tuple(out)


def _check_file_name(name: str, where: str) -> None:
    parts = name.split("/")
    if (
        not 1 <= len(name) <= MAX_NAME
        or _CONTROL.search(name)
        or "\\" in name
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise MalformedBundle(
            f"{where}.name must be a relative path of 1..{MAX_NAME} characters: no leading '/', "
            "no '..', '.' or empty parts, no backslash or control characters"
        )


def check_ranges(
    tensors: Sequence[TensorEntry],
    files: Sequence[FileEntry],
    plaintext_size: int,
    *,
    exact_size: bool = True,
) -> None:
    """Names unique, dtypes known, lengths = numel × itemsize, every range 64-byte aligned, in
    order (tensors, then files), not overlapping, inside the plaintext stream."""
    position = 0
    names: set[str] = set()
    for index, tensor in enumerate(tensors):
        where = f"manifest.tensors[{index}]"
        if type(tensor.name) is not str or not 1 <= len(tensor.name) <= MAX_NAME:
            raise MalformedBundle(f"{where}.name must be 1..{MAX_NAME} characters")
        if tensor.name in names:
            raise MalformedBundle(f"{where}.name repeats an earlier tensor's name")
        names.add(tensor.name)
        if type(tensor.dtype) is not str or tensor.dtype not in DTYPE_SIZES:
            raise MalformedBundle(f"{where}.dtype must be one of {sorted(DTYPE_SIZES)}")
        if len(tensor.shape) > MAX_DIMS or any(type(d) is not int or d < 0 for d in tensor.shape):
            raise MalformedBundle(f"{where}.shape must be at most {MAX_DIMS} unsigned integers")
        if tensor.length != math.prod(tensor.shape) * DTYPE_SIZES[tensor.dtype]:
            raise MalformedBundle(f"{where}.length is not product(shape) × itemsize")
        position = _check_range(where, tensor.offset, tensor.length, position, plaintext_size)
    names.clear()
    for index, file in enumerate(files):
        where = f"manifest.files[{index}]"
        _check_file_name(file.name, where)
        if file.name in names:
            raise MalformedBundle(f"{where}.name repeats an earlier file's name")
        names.add(file.name)
        position = _check_range(where, file.offset, file.length, position, plaintext_size)
    if exact_size and position != plaintext_size:  # pragma: no cover - BundleLayout.plan's sum
        raise MalformedBundle("plaintext_size is not the end of the last range")


def _check_range(where: str, offset: int, length: int, position: int, size: int) -> int:
    if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
        raise MalformedBundle(f"{where}: offset and length must be unsigned integers")
    if offset % ALIGNMENT:
        raise MalformedBundle(f"{where}.offset {offset} is not {ALIGNMENT}-byte aligned")
    if offset < position:
        raise MalformedBundle(f"{where}.offset {offset} overlaps or precedes the previous range")
    if offset + length > size:
        raise MalformedBundle(f"{where} ends at {offset + length}, past plaintext_size {size}")
    return offset + length


def check_json_like(value: object) -> bool:
    """Only what JSON can say: no byte strings (floats were checked finite by the decoder)."""
    if isinstance(value, dict):
        return all(check_json_like(item) for item in value.values())
    if isinstance(value, list):
        return all(check_json_like(item) for item in value)
    return not isinstance(value, bytes)


def freeze(value: Any) -> Any:
    """A read-only copy of decoded JSON-like values (maps become mapping proxies, arrays tuples)."""
    if isinstance(value, dict):
        return MappingProxyType({key: freeze(item) for key, item in value.items()})
    if isinstance(value, list):
        return tuple(freeze(item) for item in value)
    return value


def thaw(value: Any) -> Any:
    """Plain dicts and lists again (for encoding, or JSON output)."""
    if isinstance(value, Mapping):
        return {key: thaw(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [thaw(item) for item in value]
    return value
