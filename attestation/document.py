"""Parse an AWS Nitro Enclaves attestation document, enforcing AWS's field rules.

The document is a COSE_Sign1 structure (RFC 9052 §4.2), untagged as the NSM emits it (CBOR tag 18
is accepted too), whose payload is the CBOR map described in AWS's "Verifying the root of trust"
(attestation process §2 "Attestation document specification" and §3.2 "Syntactical validation")::

    AttestationDocument = {
        module_id: text, digest: "SHA384", timestamp: uint .size 8,
        pcrs: { + index => bytes .size 48 },     ; index 0..31
        certificate: bytes .size (1..1024), cabundle: [+ bytes .size (1..1024)],
        ? public_key: bytes .size (0..1024) / null,
        ? user_data: bytes .size (0..1024) / null,
        ? nonce: bytes .size (0..1024) / null,
    }

Parsing proves nothing about authenticity: :func:`attestation.verify.verify` does that, over the
payload bytes exactly as received (they are kept, never re-encoded).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from attestation._strictcbor import CborRejected, strict_loads
from attestation.errors import MalformedDocument

__all__ = [
    "COSE_ALG_ES384",
    "MAX_DOCUMENT_SIZE",
    "MAX_OPTIONAL_FIELD",
    "PCR_LENGTH",
    "AttestationDocument",
]

# The NSM driver's response buffer is 0x3000 bytes (aws-nitro-enclaves-nsm-api src/driver/mod.rs);
# a document is smaller than that. 16 KiB leaves headroom and still bounds every allocation.
MAX_DOCUMENT_SIZE = 16 * 1024
MAX_OPTIONAL_FIELD = 1024
MAX_CERTIFICATE = 1024
MAX_CABUNDLE = 16
MAX_MODULE_ID = 256
PCR_LENGTH = 48
MAX_TIMESTAMP_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
PCR_INDEXES = range(32)
COSE_ALG_ES384 = -35
_COSE_SIGN1_TAG = b"\xd2"  # CBOR tag 18 (RFC 9052 §4.2), a one-byte head
_MAX_DEPTH = 4  # COSE array > payload map > pcrs map / cabundle array > byte string
_SIGNATURE_LENGTH = 96
_COSE_ALG_NAMES = {-7: "ES256", -35: "ES384", -36: "ES512", -8: "EdDSA", -37: "PS256"}
_MODULE_ID = re.compile(r"[\x21-\x7e]+")
_REQUIRED = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle")
_OPTIONAL = ("public_key", "user_data", "nonce")
_DEBUG_PCRS = (0, 1, 2, 8)


@dataclass(frozen=True)
class AttestationDocument:
    """A syntactically valid attestation document. Not yet verified: see ``attestation.verify``."""

    raw: bytes
    protected: bytes
    payload: bytes
    signature: bytes
    module_id: str
    digest: str
    timestamp_ms: int
    pcrs: Mapping[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None

    @property
    def timestamp(self) -> datetime:
        """When the NSM made the document (UTC, millisecond precision)."""
        return datetime.fromtimestamp(self.timestamp_ms / 1000, tz=UTC)

    @property
    def is_debug_mode(self) -> bool:
        """True when PCR0, 1, 2 and 8 are all zero: the enclave runs in debug mode.

        In debug mode the hypervisor zeroes these; PCR3 and PCR4 stay populated. A missing PCR
        counts as zero, so a document that omits them cannot pass as a production one.
        """
        zero = bytes(PCR_LENGTH)
        return all(self.pcrs.get(index, zero) == zero for index in _DEBUG_PCRS)

    @classmethod
    def from_cbor(cls, data: bytes) -> AttestationDocument:
        """Parse ``data``, which comes from an untrusted party (the enclave's host, the network).

        Raises :class:`MalformedDocument` naming the field and the rule for anything that is not
        a document as AWS emits it; never any other exception type.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise MalformedDocument(f"document must be bytes, not {type(data).__name__}")
        data = bytes(data)
        # (1) bound the work before decoding anything
        if len(data) > MAX_DOCUMENT_SIZE:
            raise MalformedDocument(
                f"document is {len(data)} bytes; the maximum is {MAX_DOCUMENT_SIZE}"
            )
        # (2) COSE_Sign1 = [protected: bstr, unprotected: map, payload: bstr, signature: bstr],
        # untagged as the NSM emits it, or under tag 18 (one byte, 0xd2); no other tag anywhere
        outer = _decode(data[1:] if data[:1] == _COSE_SIGN1_TAG else data, "document")
        if not isinstance(outer, list) or len(outer) != 4:
            raise MalformedDocument("document is not a COSE_Sign1 array of 4 elements")
        protected, unprotected, payload, signature = outer
        # (3) protected header: exactly {1: -35} (alg ES384), RFC 9052 §3.1 / AWS §3.2
        _check_protected(protected)
        # (4) AWS leaves the unprotected header empty; anything in it is unauthenticated input
        if unprotected != {}:
            raise MalformedDocument("unprotected header must be an empty map")
        if not isinstance(payload, bytes) or not payload:
            raise MalformedDocument("payload must be a non-empty byte string")
        if not isinstance(signature, bytes) or len(signature) != _SIGNATURE_LENGTH:
            length = len(signature) if isinstance(signature, bytes) else type(signature).__name__
            raise MalformedDocument(
                f"signature is {length}; an ES384 signature is {_SIGNATURE_LENGTH} bytes (r‖s)"
            )
        # (5) the payload map, definite or indefinite length, with AWS's field rules
        fields = _parse_payload(payload)
        return cls(raw=data, protected=protected, payload=payload, signature=signature, **fields)


def _decode(data: bytes, what: str) -> Any:
    try:
        return strict_loads(data, max_depth=_MAX_DEPTH, text_keys=False)
    except CborRejected as exc:
        raise MalformedDocument(f"{what} is not strict CBOR: {exc}") from None


def _check_protected(protected: Any) -> None:
    if not isinstance(protected, bytes):
        raise MalformedDocument("protected header must be a byte string")
    header = _decode(protected, "protected header")
    if not isinstance(header, dict) or len(header) != 1 or type(next(iter(header))) is not int:
        raise MalformedDocument("protected header must be exactly {1: alg}")
    if 1 not in header:
        raise MalformedDocument("protected header must be exactly {1: alg}")
    alg = header[1]
    if type(alg) is not int or alg != COSE_ALG_ES384:
        name = _COSE_ALG_NAMES.get(alg, repr(alg)) if isinstance(alg, int) else repr(alg)
        raise MalformedDocument(
            f"protected header alg is {name}; only ES384 ({COSE_ALG_ES384}) is accepted"
        )


def _parse_payload(payload: bytes) -> dict[str, Any]:
    body = _decode(payload, "payload")
    if not isinstance(body, dict):
        raise MalformedDocument("payload must be a CBOR map")
    keys = set(body)
    if not all(isinstance(key, str) for key in keys):
        raise MalformedDocument("payload keys must be text strings")
    missing = [key for key in _REQUIRED if key not in keys]
    if missing:
        raise MalformedDocument(f"payload lacks required field(s): {', '.join(missing)}")
    unknown = sorted(keys - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise MalformedDocument(f"payload has unknown field(s): {', '.join(unknown)}")

    module_id = body["module_id"]
    if not isinstance(module_id, str) or not 0 < len(module_id) <= MAX_MODULE_ID:
        raise MalformedDocument(f"module_id must be a non-empty text of at most {MAX_MODULE_ID}")
    # AWS's ids look like "i-0123…-enc0123…": printable ASCII without spaces. Anything else
    # (control characters, escape sequences) could forge lines in an auditor's terminal.
    if not _MODULE_ID.fullmatch(module_id):
        raise MalformedDocument("module_id must be printable ASCII without spaces")
    if body["digest"] != "SHA384":
        raise MalformedDocument(f"digest is {body['digest']!r}; only 'SHA384' is accepted")
    timestamp = body["timestamp"]
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise MalformedDocument("timestamp must be an unsigned integer (milliseconds)")
    if not 0 < timestamp <= MAX_TIMESTAMP_MS:
        raise MalformedDocument("timestamp must be > 0 and before year 10000 (milliseconds)")

    return {
        "module_id": module_id,
        "digest": "SHA384",
        "timestamp_ms": timestamp,
        "pcrs": _parse_pcrs(body["pcrs"]),
        "certificate": _bstr(body["certificate"], "certificate", 1, MAX_CERTIFICATE),
        "cabundle": _parse_cabundle(body["cabundle"]),
        **{key: _optional(body.get(key), key) for key in _OPTIONAL},
    }


def _parse_pcrs(pcrs: Any) -> Mapping[int, bytes]:
    if not isinstance(pcrs, dict) or not 0 < len(pcrs) <= len(PCR_INDEXES):
        raise MalformedDocument(f"pcrs must be a map of 1 to {len(PCR_INDEXES)} entries")
    out: dict[int, bytes] = {}
    for index, value in pcrs.items():
        if isinstance(index, bool) or not isinstance(index, int) or index not in PCR_INDEXES:
            raise MalformedDocument(f"pcrs has index {index!r}; indexes are 0 to 31")
        if not isinstance(value, bytes):
            raise MalformedDocument(f"pcrs[{index}] must be a byte string")
        if len(value) != PCR_LENGTH:
            raise MalformedDocument(
                f"pcrs[{index}] is {len(value)} bytes; SHA384 PCRs are {PCR_LENGTH}"
            )
        out[index] = value
    return MappingProxyType(dict(sorted(out.items())))


def _parse_cabundle(cabundle: Any) -> tuple[bytes, ...]:
    if not isinstance(cabundle, list) or not cabundle:
        raise MalformedDocument("cabundle must be a non-empty array")
    if len(cabundle) > MAX_CABUNDLE:
        raise MalformedDocument(f"cabundle has {len(cabundle)} entries; at most {MAX_CABUNDLE}")
    return tuple(
        _bstr(cert, f"cabundle[{i}]", 1, MAX_CERTIFICATE) for i, cert in enumerate(cabundle)
    )


def _bstr(value: Any, name: str, minimum: int, maximum: int) -> bytes:
    if not isinstance(value, bytes):
        raise MalformedDocument(f"{name} must be a byte string")
    if not minimum <= len(value) <= maximum:
        raise MalformedDocument(f"{name} is {len(value)} bytes; allowed {minimum} to {maximum}")
    return value


def _optional(value: Any, name: str) -> bytes | None:
    """Optional fields are absent, null or a byte string of 0..1024 bytes; empty means absent."""
    if value is None:
        return None
    value = _bstr(value, name, 0, MAX_OPTIONAL_FIELD)
    return value or None
