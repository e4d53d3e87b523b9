"""Read and check a safetensors header without loading a tensor (plumbing of :mod:`provider.seal`).

The layout (huggingface/safetensors ``README.md``, "Format"): an unsigned little-endian 64-bit
header size ``N``, then ``N`` bytes of UTF-8 JSON (possibly padded with spaces), then the byte
buffer. The JSON maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the buffer) and may hold ``"__metadata__"``: a map of text to text. The buffer
is entirely indexed: tensors are contiguous, do not overlap and leave no hole.

Model files are the provider's own, but they may come from anywhere (a hub download, a
colleague): every rule is checked before a byte of the buffer is trusted to mean a tensor.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn

from protocol.bundle import DTYPE_SIZES
from provider.errors import InvalidModel

__all__ = ["MAX_HEADER_SIZE", "SafetensorsFile", "SafetensorsTensor", "read_header"]

MAX_HEADER_SIZE: Final = 100 * 1024 * 1024  # the reference implementation's limit
_METADATA: Final = "__metadata__"
_TENSOR_KEYS: Final = frozenset({"dtype", "shape", "data_offsets"})


@dataclass(frozen=True)
class SafetensorsTensor:
    """One tensor: its bytes are ``[start, end)`` of the file (absolute offsets)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsFile:
    """A checked safetensors file: its tensors in buffer order, and its metadata."""

    path: Path
    size: int
    tensors: tuple[SafetensorsTensor, ...]
    metadata: Mapping[str, str]


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError("duplicate key in a JSON object")
        out[key] = value
    return out


def _uint(value: object) -> bool:
    return type(value) is int and value >= 0


def read_header(path: Path) -> SafetensorsFile:
    """Parse and check ``path``'s header; raises :class:`InvalidModel` naming the rule broken."""

    def bad(rule: str) -> NoReturn:
        raise InvalidModel(f"{path.name}: {rule}")

    try:
        with path.open("rb") as handle:
            size = path.stat().st_size
            # (1) the 8-byte little-endian header size, bounded before anything is read
            head = handle.read(8)
            if len(head) != 8:
                bad("shorter than the 8-byte header size")
            header_size = int.from_bytes(head, "little")
            if header_size > MAX_HEADER_SIZE:
                bad(f"header of {header_size} bytes exceeds {MAX_HEADER_SIZE}")
            if 8 + header_size > size:
                bad(f"truncated: the header needs {header_size} bytes, the file has {size - 8}")
            raw = handle.read(header_size)
    except OSError as exc:
        raise InvalidModel(f"{path.name}: cannot read ({exc.strerror or exc})") from None
    if len(raw) != header_size:
        bad("truncated while reading the header")
    # (2) strict JSON: UTF-8, one object, no duplicate keys, no NaN or Infinity
    try:
        header = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        bad(f"header is not strict UTF-8 JSON ({type(exc).__name__})")
    if not isinstance(header, dict):
        bad("header is not a JSON object")
    metadata = header.pop(_METADATA, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        bad("__metadata__ must map text to text")
    # (3) each tensor: a known dtype, a shape of unsigned integers, offsets that hold it exactly
    buffer_start, buffer_size = 8 + header_size, size - 8 - header_size
    tensors: list[SafetensorsTensor] = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != _TENSOR_KEYS:
            bad(f"tensor {name!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if type(dtype) is not str or dtype not in DTYPE_SIZES:
            bad(
                f"tensor {name!r} has dtype {dtype!r}; bundle format v1 supports "
                f"{', '.join(sorted(DTYPE_SIZES))}"
            )
        if not isinstance(shape, list) or not all(_uint(d) for d in shape):
            bad(f"tensor {name!r}: shape must be a list of unsigned integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_uint(o) for o in offsets)
            or offsets[0] > offsets[1]
        ):
            bad(f"tensor {name!r}: data_offsets must be [begin, end] with begin <= end")
        begin, end = offsets
        if end > buffer_size:
            bad(f"tensor {name!r} ends at {end}, past the {buffer_size}-byte buffer")
        if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
            bad(f"tensor {name!r}: data_offsets span {end - begin} bytes, not numel × itemsize")
        tensors.append(
            SafetensorsTensor(name, dtype, tuple(shape), buffer_start + begin, buffer_start + end)
        )
    # (4) the buffer is entirely indexed: contiguous, no overlap, no hole, nothing after
    tensors.sort(key=lambda t: (t.start, t.end))
    position = buffer_start
    for tensor in tensors:
        if tensor.start != position:
            rule = "overlaps the previous tensor" if tensor.start < position else "leaves a hole"
            bad(f"tensor {tensor.name!r} {rule} (data_offsets must be contiguous)")
        position = tensor.end
    if position != size:
        bad(f"{size - position} bytes after the last tensor are not indexed")
    return SafetensorsFile(path, size, tuple(tensors), dict(metadata))
