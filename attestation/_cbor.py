"""Strict CBOR decoding for bytes that come from the other side of a trust boundary.

``cbor2.loads`` silently ignores trailing bytes and keeps the last of duplicate map keys; a parser
that accepts either can be made to disagree with the signer about what was signed. This wrapper
decodes exactly one item, refuses trailing bytes, duplicate keys and deep nesting, and turns every
decoder failure into the caller's error type, so that arbitrary bytes raise only that type.
"""

from __future__ import annotations

import io
from typing import Any

import cbor2

__all__ = ["strict_loads"]

_MAX_DEPTH = 16


def strict_loads(
    data: bytes, *, what: str, error: type[Exception], max_depth: int = _MAX_DEPTH
) -> Any:
    """Decode one CBOR item from ``data`` (untrusted) or raise ``error`` naming ``what``."""
    fp = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(fp, max_depth=max_depth, allow_duplicate_keys=False)
        value = decoder.decode()
    # cbor2 raises CBORDecodeError for most faults but ValueError, TypeError, OverflowError,
    # RecursionError or MemoryError for some hostile inputs; all of them mean "malformed".
    except (
        cbor2.CBORError,
        ValueError,
        TypeError,
        OverflowError,
        RecursionError,
        MemoryError,
    ) as exc:
        raise error(f"{what} is not valid CBOR: {_short(exc)}") from None
    consumed = fp.tell()
    if consumed != len(data):
        raise error(f"{what} has {len(data) - consumed} trailing bytes after its CBOR item")
    return value


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."
