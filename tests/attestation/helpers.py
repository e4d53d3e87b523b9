"""Shared helpers for attestation tests: load the real documents, take them apart, rebuild them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "attestation"
PRODUCTION = (1, 3, 6)
DEBUG = (2, 4, 5, 7)
BAD_SIGNATURE = 8
ALL = (*PRODUCTION, *DEBUG, BAD_SIGNATURE)


def raw(n: int) -> bytes:
    return (ASSETS / f"nitro-doc-{n}.cbor").read_bytes()


def meta(n: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ASSETS / f"nitro-doc-{n}.json").read_text())
    return data


def doc_time(n: int) -> datetime:
    return datetime.fromtimestamp(meta(n)["timestamp_ms"] / 1000, tz=UTC)


def just_after(n: int) -> datetime:
    return doc_time(n) + timedelta(seconds=1)


def pcrs(n: int, *indexes: int) -> dict[int, bytes]:
    m = meta(n)
    return {i: bytes.fromhex(m[f"pcr{i}"]) for i in indexes}


def split(data: bytes) -> tuple[bytes, dict[Any, Any], bytes, bytes]:
    protected, unprotected, payload, signature = cbor2.loads(data)
    return protected, unprotected, payload, signature


def payload_map(data: bytes) -> dict[str, Any]:
    body: dict[str, Any] = cbor2.loads(split(data)[2])
    return body


def rebuild(
    data: bytes,
    *,
    protected: bytes | None = None,
    unprotected: Any = None,
    payload: bytes | None = None,
    signature: bytes | None = None,
) -> bytes:
    p, u, pl, s = split(data)
    return cbor2.dumps(
        [
            p if protected is None else protected,
            u if unprotected is None else unprotected,
            pl if payload is None else payload,
            s if signature is None else signature,
        ]
    )


def with_payload_fields(data: bytes, **changes: Any) -> bytes:
    body = payload_map(data)
    for key, value in changes.items():
        if value is _DELETE:
            del body[key]
        else:
            body[key] = value
    return rebuild(data, payload=cbor2.dumps(body))


def indefinite_map(body: dict[Any, Any]) -> bytes:
    """Encode ``body`` as an indefinite-length map (0xbf … 0xff), as newer AWS documents are."""
    return b"\xbf" + b"".join(cbor2.dumps(k) + cbor2.dumps(v) for k, v in body.items()) + b"\xff"


class _Delete:
    pass


DELETE: Any = _Delete()
_DELETE = DELETE
