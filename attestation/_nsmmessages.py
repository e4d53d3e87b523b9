"""NSM request and response messages, and their CBOR encoding (private; use ``attestation.nsm``).

The encoding is exactly what ``aws-nitro-enclaves-nsm-api`` produces with serde_cbor for its
``Request`` and ``Response`` enums (src/api/mod.rs): externally tagged, so a unit variant is a text
string (``"DescribeNSM"``), a struct variant a one-entry map ``{"VariantName": {field: value}}``
with the fields in declaration order, and the newtype variant ``Error(ErrorCode)`` is
``{"Error": "InvalidIndex"}``. Byte fields (``serde_bytes``) are CBOR byte strings and
``Option::None`` is CBOR null.

Decoders take bytes from the other side of a trust boundary and raise only
:class:`~attestation.errors.NsmError`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Final, TypeAlias

import cbor2

from attestation._strictcbor import CborRejected, strict_loads
from attestation.errors import NsmError

__all__ = [
    "ATTESTATION_FIELD_MAX_SIZE",
    "ERROR_CODES",
    "NSM_REQUEST_MAX_SIZE",
    "NSM_RESPONSE_MAX_SIZE",
    "AttestationRequest",
    "AttestationResponse",
    "DescribeNsmRequest",
    "DescribeNsmResponse",
    "DescribePcrRequest",
    "DescribePcrResponse",
    "ErrorResponse",
    "ExtendPcrRequest",
    "ExtendPcrResponse",
    "GetRandomRequest",
    "GetRandomResponse",
    "LockPcrRequest",
    "LockPcrResponse",
    "LockPcrsRequest",
    "LockPcrsResponse",
    "Request",
    "Response",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
]

NSM_REQUEST_MAX_SIZE: Final = 0x1000
"""Largest request the driver accepts (src/driver/mod.rs ``NSM_REQUEST_MAX_SIZE``)."""

NSM_RESPONSE_MAX_SIZE: Final = 0x3000
"""Size of the response buffer lent to the driver (src/driver/mod.rs ``NSM_RESPONSE_MAX_SIZE``)."""

ATTESTATION_FIELD_MAX_SIZE: Final = 1024
"""Largest ``user_data``, ``nonce`` or ``public_key`` the NSM signs (nsm-test nsm-check.rs sends
1024 bytes of each; docs/attestation_process.md §2.2 ``user_data = bytes .size (0..1024)``)."""

ERROR_CODES: Final = (
    "Success",
    "InvalidArgument",
    "InvalidIndex",
    "InvalidResponse",
    "ReadOnlyIndex",
    "InvalidOperation",
    "BufferTooSmall",
    "InputTooLarge",
    "InternalError",
)
"""The names of ``ErrorCode`` (src/api/mod.rs), in declaration order."""

_DIGESTS: Final = frozenset({"SHA256", "SHA384", "SHA512"})
_PCR_LENGTHS: Final = frozenset({32, 48, 64})
_U16_MAX: Final = 0xFFFF
_MAX_DEPTH: Final = 4  # deepest legitimate message: map → map → array → uint


# -- typed messages -------------------------------------------------------------------------------


def _check_u16(value: int, field: str, code: str) -> None:
    if type(value) is not int or not 0 <= value <= _U16_MAX:
        raise NsmError(
            f"{field} is {value!r}; it must be an integer in [0, 65535] (u16)", code=code
        )


def _check_bytes(value: object, field: str, code: str) -> None:
    if type(value) is not bytes:
        raise NsmError(f"{field} is a {type(value).__name__}; it must be bytes", code=code)


@dataclass(frozen=True, slots=True)
class DescribePcrRequest:
    """``Request::DescribePCR { index: u16 }``: read a PCR and its lock state."""

    index: int

    def __post_init__(self) -> None:
        _check_u16(self.index, "DescribePCR.index", "InvalidArgument")


@dataclass(frozen=True, slots=True)
class ExtendPcrRequest:
    """``Request::ExtendPCR { index: u16, data: bytes }``: PCR = SHA384(PCR ‖ data)."""

    index: int
    data: bytes

    def __post_init__(self) -> None:
        _check_u16(self.index, "ExtendPCR.index", "InvalidArgument")
        _check_bytes(self.data, "ExtendPCR.data", "InvalidArgument")


@dataclass(frozen=True, slots=True)
class LockPcrRequest:
    """``Request::LockPCR { index: u16 }``: make one PCR read-only."""

    index: int

    def __post_init__(self) -> None:
        _check_u16(self.index, "LockPCR.index", "InvalidArgument")


@dataclass(frozen=True, slots=True)
class LockPcrsRequest:
    """``Request::LockPCRs { range: u16 }``: make PCRs ``[0, range)`` read-only."""

    range: int

    def __post_init__(self) -> None:
        _check_u16(self.range, "LockPCRs.range", "InvalidArgument")


@dataclass(frozen=True, slots=True)
class DescribeNsmRequest:
    """``Request::DescribeNSM``: the module's version, id and PCR bank."""


@dataclass(frozen=True, slots=True)
class AttestationRequest:
    """``Request::Attestation { user_data, nonce, public_key }``: a signed attestation document."""

    user_data: bytes | None = None
    nonce: bytes | None = None
    public_key: bytes | None = None

    def __post_init__(self) -> None:
        for name in ("user_data", "nonce", "public_key"):
            value = getattr(self, name)
            if value is not None:
                _check_bytes(value, f"Attestation.{name}", "InvalidArgument")


@dataclass(frozen=True, slots=True)
class GetRandomRequest:
    """``Request::GetRandom``: entropy from the module."""


Request: TypeAlias = (
    DescribePcrRequest
    | ExtendPcrRequest
    | LockPcrRequest
    | LockPcrsRequest
    | DescribeNsmRequest
    | AttestationRequest
    | GetRandomRequest
)


@dataclass(frozen=True, slots=True)
class DescribePcrResponse:
    """``Response::DescribePCR { lock: bool, data: bytes }``."""

    lock: bool
    data: bytes


@dataclass(frozen=True, slots=True)
class ExtendPcrResponse:
    """``Response::ExtendPCR { data: bytes }``: the PCR's new value."""

    data: bytes


@dataclass(frozen=True, slots=True)
class LockPcrResponse:
    """``Response::LockPCR``."""


@dataclass(frozen=True, slots=True)
class LockPcrsResponse:
    """``Response::LockPCRs``."""


@dataclass(frozen=True, slots=True)
class DescribeNsmResponse:
    """``Response::DescribeNSM { version_major, version_minor, version_patch, module_id, max_pcrs,
    locked_pcrs, digest }``; ``locked_pcrs`` is a ``BTreeSet<u16>``, kept sorted here."""

    version_major: int
    version_minor: int
    version_patch: int
    module_id: str
    max_pcrs: int
    locked_pcrs: tuple[int, ...]
    digest: str


@dataclass(frozen=True, slots=True)
class AttestationResponse:
    """``Response::Attestation { document: bytes }``: the COSE_Sign1 attestation document."""

    document: bytes


@dataclass(frozen=True, slots=True)
class GetRandomResponse:
    """``Response::GetRandom { random: bytes }``."""

    random: bytes


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """``Response::Error(ErrorCode)``; ``code`` is one of :data:`ERROR_CODES`."""

    code: str

    def __post_init__(self) -> None:
        if self.code not in ERROR_CODES:
            raise NsmError(
                f"Error code {self.code!r} is not an NSM ErrorCode", code="InvalidArgument"
            )


Response: TypeAlias = (
    DescribePcrResponse
    | ExtendPcrResponse
    | LockPcrResponse
    | LockPcrsResponse
    | DescribeNsmResponse
    | AttestationResponse
    | GetRandomResponse
    | ErrorResponse
)


# -- encoding -------------------------------------------------------------------------------------


def _request_value(request: Request) -> object:
    match request:
        case DescribePcrRequest(index=index):
            return {"DescribePCR": {"index": index}}
        case ExtendPcrRequest(index=index, data=data):
            return {"ExtendPCR": {"index": index, "data": data}}
        case LockPcrRequest(index=index):
            return {"LockPCR": {"index": index}}
        case LockPcrsRequest(range=range_):
            return {"LockPCRs": {"range": range_}}
        case DescribeNsmRequest():
            return "DescribeNSM"
        case AttestationRequest(user_data=user_data, nonce=nonce, public_key=public_key):
            # Field order is the Rust declaration order: user_data, nonce, public_key.
            return {
                "Attestation": {"user_data": user_data, "nonce": nonce, "public_key": public_key}
            }
        case GetRandomRequest():
            return "GetRandom"
    raise TypeError(f"{type(request).__name__} is not an NSM request")  # pragma: no cover


def encode_request(request: Request) -> bytes:
    """The CBOR bytes ``serde_cbor::to_vec(&request)`` produces for ``request``.

    The size limit (:data:`NSM_REQUEST_MAX_SIZE`) is enforced by whoever sends the bytes, as the
    Rust driver does after encoding.
    """
    return cbor2.dumps(_request_value(request))


def _response_value(response: Response) -> object:
    match response:
        case DescribePcrResponse(lock=lock, data=data):
            return {"DescribePCR": {"lock": lock, "data": data}}
        case ExtendPcrResponse(data=data):
            return {"ExtendPCR": {"data": data}}
        case LockPcrResponse():
            return "LockPCR"
        case LockPcrsResponse():
            return "LockPCRs"
        case DescribeNsmResponse():
            return {
                "DescribeNSM": {
                    "version_major": response.version_major,
                    "version_minor": response.version_minor,
                    "version_patch": response.version_patch,
                    "module_id": response.module_id,
                    "max_pcrs": response.max_pcrs,
                    "locked_pcrs": sorted(set(response.locked_pcrs)),
                    "digest": response.digest,
                }
            }
        case AttestationResponse(document=document):
            return {"Attestation": {"document": document}}
        case GetRandomResponse(random=random):
            return {"GetRandom": {"random": random}}
        case ErrorResponse(code=code):
            return {"Error": code}
    raise TypeError(f"{type(response).__name__} is not an NSM response")  # pragma: no cover


def encode_response(response: Response) -> bytes:
    """The CBOR bytes ``serde_cbor::to_vec(&response)`` produces for ``response``."""
    return cbor2.dumps(_response_value(response))


# -- decoding ------------------------------------------------------------------------------


class _Malformed(Exception):
    """Internal: the message breaks a rule; turned into an NsmError with the caller's code."""


def _loads(data: bytes, what: str, code: str) -> object:
    try:
        return strict_loads(data, max_depth=_MAX_DEPTH)
    except CborRejected as exc:
        raise NsmError(f"{what} is not a well-formed NSM message: {exc}", code=code) from None


def _variant(value: object, what: str) -> tuple[str, object | None]:
    """Split an externally tagged enum value into (variant name, body or None for unit)."""
    if type(value) is str:
        return value, None
    if type(value) is dict and len(value) == 1:
        ((name, body),) = value.items()
        return name, body
    raise _Malformed(f"{what} must be a variant name or a one-entry map")


def _fields(
    body: object, variant: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, object]:
    if type(body) is not dict:
        raise _Malformed(f"{variant} must carry a map of fields")
    unknown = sorted(set(body) - set(required) - set(optional))
    if unknown:
        raise _Malformed(f"{variant} has unknown fields {unknown}")
    missing = [name for name in required if name not in body]
    if missing:
        raise _Malformed(f"{variant} lacks fields {missing}")
    return body


def _u16(value: object, field: str) -> int:
    if type(value) is not int or not 0 <= value <= _U16_MAX:
        raise _Malformed(f"{field} must be a u16")
    return value


def _bytes(value: object, field: str) -> bytes:
    if type(value) is not bytes:
        raise _Malformed(f"{field} must be a byte string")
    return value


def _optional_bytes(value: object, field: str) -> bytes | None:
    return None if value is None else _bytes(value, field)


class _UnknownVariant(_Malformed):
    def __init__(self, name: str) -> None:
        super().__init__(f"{name[:40]!r} is not an NSM variant")


_REQUEST_UNITS: Final[dict[str, Request]] = {
    "DescribeNSM": DescribeNsmRequest(),
    "GetRandom": GetRandomRequest(),
}
_REQUEST_STRUCTS: Final = frozenset(
    {"DescribePCR", "ExtendPCR", "LockPCR", "LockPCRs", "Attestation"}
)


def _parse_request(value: object) -> Request:
    name, body = _variant(value, "a request")
    if body is None:
        if name in _REQUEST_UNITS:
            return _REQUEST_UNITS[name]
        if name in _REQUEST_STRUCTS:
            raise _Malformed(f"{name} needs fields")
        raise _UnknownVariant(name)
    if name == "DescribePCR":
        fields = _fields(body, name, ("index",))
        return DescribePcrRequest(index=_u16(fields["index"], "DescribePCR.index"))
    if name == "ExtendPCR":
        fields = _fields(body, name, ("index", "data"))
        return ExtendPcrRequest(
            index=_u16(fields["index"], "ExtendPCR.index"),
            data=_bytes(fields["data"], "ExtendPCR.data"),
        )
    if name == "LockPCR":
        fields = _fields(body, name, ("index",))
        return LockPcrRequest(index=_u16(fields["index"], "LockPCR.index"))
    if name == "LockPCRs":
        fields = _fields(body, name, ("range",))
        return LockPcrsRequest(range=_u16(fields["range"], "LockPCRs.range"))
    if name == "Attestation":
        # serde fills an absent Option field with None, so the three fields are optional keys.
        fields = _fields(body, name, (), ("user_data", "nonce", "public_key"))
        return AttestationRequest(
            user_data=_optional_bytes(fields.get("user_data"), "Attestation.user_data"),
            nonce=_optional_bytes(fields.get("nonce"), "Attestation.nonce"),
            public_key=_optional_bytes(fields.get("public_key"), "Attestation.public_key"),
        )
    if name in _REQUEST_UNITS:
        raise _Malformed(f"{name} is a unit variant and carries no fields")
    raise _UnknownVariant(name)


def decode_request(data: bytes) -> Request:
    """Parse one NSM request.

    ``data`` comes from the enclave application, the other side of the NSM's trust boundary. A
    request over :data:`NSM_REQUEST_MAX_SIZE` raises ``NsmError(code="InputTooLarge")``; a request
    naming no known operation ``code="InvalidOperation"`` (as QEMU's virtio-nsm answers); any
    other malformation ``code="InvalidArgument"``.
    """
    if type(data) is bytes and len(data) > NSM_REQUEST_MAX_SIZE:
        raise NsmError(
            f"request is {len(data)} bytes; the NSM accepts at most {NSM_REQUEST_MAX_SIZE}",
            code="InputTooLarge",
        )
    value = _loads(data, "request", "InvalidArgument")
    try:
        return _parse_request(value)
    except _UnknownVariant as exc:
        raise NsmError(f"request: {exc}", code="InvalidOperation") from None
    except _Malformed as exc:
        raise NsmError(f"request: {exc}", code="InvalidArgument") from None


_RESPONSE_UNITS: Final[dict[str, Response]] = {
    "LockPCR": LockPcrResponse(),
    "LockPCRs": LockPcrsResponse(),
}


def _pcr_value(value: object, field: str) -> bytes:
    data = _bytes(value, field)
    if len(data) not in _PCR_LENGTHS:
        raise _Malformed(f"{field} is {len(data)} bytes; PCRs are 32, 48 or 64")
    return data


def _parse_describe_nsm(body: object) -> DescribeNsmResponse:
    names = (
        "version_major",
        "version_minor",
        "version_patch",
        "module_id",
        "max_pcrs",
        "locked_pcrs",
        "digest",
    )
    fields = _fields(body, "DescribeNSM", names)
    module_id = fields["module_id"]
    if type(module_id) is not str or not module_id:
        raise _Malformed("DescribeNSM.module_id must be non-empty text")
    digest = fields["digest"]
    if type(digest) is not str or digest not in _DIGESTS:
        raise _Malformed("DescribeNSM.digest must be SHA256, SHA384 or SHA512")
    locked = fields["locked_pcrs"]
    if type(locked) is not list:
        raise _Malformed("DescribeNSM.locked_pcrs must be an array")
    indices = tuple(_u16(index, "DescribeNSM.locked_pcrs[]") for index in locked)
    if any(a >= b for a, b in itertools.pairwise(indices)):
        raise _Malformed("DescribeNSM.locked_pcrs must be sorted without repeats (a BTreeSet)")
    return DescribeNsmResponse(
        version_major=_u16(fields["version_major"], "DescribeNSM.version_major"),
        version_minor=_u16(fields["version_minor"], "DescribeNSM.version_minor"),
        version_patch=_u16(fields["version_patch"], "DescribeNSM.version_patch"),
        module_id=module_id,
        max_pcrs=_u16(fields["max_pcrs"], "DescribeNSM.max_pcrs"),
        locked_pcrs=indices,
        digest=digest,
    )


def _parse_response(value: object) -> Response:
    name, body = _variant(value, "a response")
    if body is None:
        if name in _RESPONSE_UNITS:
            return _RESPONSE_UNITS[name]
        raise _Malformed(f"{name[:40]!r} is not a unit response variant")
    if name == "Error":
        if type(body) is not str or body not in ERROR_CODES:
            raise _Malformed("Error must carry an ErrorCode name")
        return ErrorResponse(code=body)
    if name == "DescribePCR":
        fields = _fields(body, name, ("lock", "data"))
        if type(fields["lock"]) is not bool:
            raise _Malformed("DescribePCR.lock must be a boolean")
        return DescribePcrResponse(
            lock=fields["lock"], data=_pcr_value(fields["data"], "DescribePCR.data")
        )
    if name == "ExtendPCR":
        fields = _fields(body, name, ("data",))
        return ExtendPcrResponse(data=_pcr_value(fields["data"], "ExtendPCR.data"))
    if name == "DescribeNSM":
        return _parse_describe_nsm(body)
    if name == "Attestation":
        fields = _fields(body, name, ("document",))
        document = _bytes(fields["document"], "Attestation.document")
        if not document:
            raise _Malformed("Attestation.document is empty")
        return AttestationResponse(document=document)
    if name == "GetRandom":
        fields = _fields(body, name, ("random",))
        return GetRandomResponse(random=_bytes(fields["random"], "GetRandom.random"))
    raise _Malformed(f"{name[:40]!r} is not a struct response variant")


def decode_response(data: bytes) -> Response:
    """Parse one NSM response.

    ``data`` comes from the NSM device driver (or an emulator), across a trust boundary. Anything
    but a well-formed response raises ``NsmError(code="InvalidResponse")``.
    """
    if type(data) is bytes and len(data) > NSM_RESPONSE_MAX_SIZE:
        raise NsmError(
            f"response is {len(data)} bytes; NSM responses are at most {NSM_RESPONSE_MAX_SIZE}",
            code="InvalidResponse",
        )
    value = _loads(data, "response", "InvalidResponse")
    try:
        return _parse_response(value)
    except _Malformed as exc:
        raise NsmError(f"response: {exc}", code="InvalidResponse") from None
