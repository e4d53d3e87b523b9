"""A minimal safetensors writer and strict reader (plumbing of :mod:`enclave.models.anymal`).

Layout (huggingface/safetensors ``README.md``, "Format"): an unsigned little-endian 64-bit header
size ``N``, ``N`` bytes of UTF-8 JSON mapping each tensor name to ``{"dtype", "shape",
"data_offsets"}`` (plus an optional ``"__metadata__"`` map of text to text), then the byte buffer,
entirely indexed by the tensors (contiguous, no overlap, no hole). Never pickle.

``data`` handed to :func:`loads` may come from a decrypted bundle: every rule is checked before a
byte of the buffer is interpreted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import torch

__all__ = ["dumps", "loads"]

MAX_HEADER_SIZE: Final = 100 * 1024 * 1024
_DTYPES: Final[dict[str, torch.dtype]] = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
}
_NAMES: Final = {v: k for k, v in _DTYPES.items()}


def dumps(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise ``tensors`` (F32, BF16 or I64) in name order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}; supported: {list(_DTYPES)}")
        raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
        header[name] = {
            "dtype": _NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(chunks)


def loads(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse ``data``; raises ``ValueError`` naming the rule broken."""
    # (1) the header size, bounded before the header is read
    if len(data) < 8:
        raise ValueError("shorter than the 8-byte header size")
    size = int.from_bytes(data[:8], "little")
    if size > MAX_HEADER_SIZE or 8 + size > len(data):
        raise ValueError(f"header size {size} does not fit a file of {len(data)} bytes")
    # (2) strict JSON object
    try:
        header = json.loads(data[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"header is not UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("__metadata__ must map text to text")
    # (3) each tensor: known dtype, unsigned shape, offsets holding it exactly, buffer fully indexed
    buffer = memoryview(data)[8 + size :]
    spans: list[tuple[int, int]] = []
    out: dict[str, torch.Tensor] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"tensor {name!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPES:
            raise ValueError(f"tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"tensor {name!r} shape must be a list of unsigned integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= len(buffer)
        ):
            raise ValueError(f"tensor {name!r} data_offsets lie outside the buffer")
        itemsize = torch.empty((), dtype=_DTYPES[dtype]).element_size()
        if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
            raise ValueError(f"tensor {name!r} offsets do not hold shape {shape} of {dtype}")
        spans.append((offsets[0], offsets[1]))
        raw = bytes(buffer[offsets[0] : offsets[1]])
        if dtype == "BF16":
            arr = torch.from_numpy(np.frombuffer(raw, dtype="<i2").copy()).view(torch.bfloat16)
        elif dtype == "F32":
            arr = torch.from_numpy(np.frombuffer(raw, dtype="<f4").copy())
        else:
            arr = torch.from_numpy(np.frombuffer(raw, dtype="<i8").copy())
        out[name] = arr.reshape(shape)
    position = 0
    for start, end in sorted(spans):
        if start != position:
            raise ValueError("tensors overlap or leave a hole in the buffer")
        position = end
    if position != len(buffer):
        raise ValueError("the buffer has bytes no tensor indexes")
    return out, dict(metadata)
