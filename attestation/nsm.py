"""The Nitro Security Module (NSM) interface: its request/response API and the real ``/dev/nsm``.

Messages
    Requests and responses are CBOR, encoded exactly as ``aws-nitro-enclaves-nsm-api`` encodes its
    ``Request`` and ``Response`` enums (src/api/mod.rs); the typed dataclasses and the codec live in
    :mod:`attestation._nsmmessages` and are re-exported here.

Transport
    One ioctl, ``NSM_IOCTL_RAW = _IOWR(0x0A, 0, struct nsm_raw)`` = ``0xC0200A00``, whose argument
    holds two iovecs: the request (at most ``0x1000`` bytes) and a response buffer (``0x3000``
    bytes) whose length the kernel rewrites (src/driver/mod.rs; Linux include/uapi/linux/nsm.h).

Two implementations of :class:`Nsm` exist: :class:`NsmDevice` here, and
:class:`attestation.emulator.EmulatedNsm`, which answers the same bytes in-process.
:class:`NsmClient` is the typed layer over either.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Protocol, TypeVar

from attestation._nsmmessages import (
    ATTESTATION_FIELD_MAX_SIZE,
    ERROR_CODES,
    NSM_REQUEST_MAX_SIZE,
    NSM_RESPONSE_MAX_SIZE,
    AttestationRequest,
    AttestationResponse,
    DescribeNsmRequest,
    DescribeNsmResponse,
    DescribePcrRequest,
    DescribePcrResponse,
    ErrorResponse,
    ExtendPcrRequest,
    ExtendPcrResponse,
    GetRandomRequest,
    GetRandomResponse,
    LockPcrRequest,
    LockPcrResponse,
    LockPcrsRequest,
    LockPcrsResponse,
    Request,
    Response,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from attestation.errors import NsmError, NsmTransportError

__all__ = [
    "ATTESTATION_FIELD_MAX_SIZE",
    "ERROR_CODES",
    "NSM_IOCTL_RAW",
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
    "IoctlFunction",
    "LockPcrRequest",
    "LockPcrResponse",
    "LockPcrsRequest",
    "LockPcrsResponse",
    "Nsm",
    "NsmClient",
    "NsmDescription",
    "NsmDevice",
    "PcrState",
    "Request",
    "Response",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "ioc",
]

NsmDescription = DescribeNsmResponse
"""What :meth:`NsmClient.describe_nsm` returns."""

# -- the ioctl number (Linux include/uapi/asm-generic/ioctl.h) ----------------------------------

_IOC_NRBITS: Final = 8
_IOC_TYPEBITS: Final = 8
_IOC_SIZEBITS: Final = 14
_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT: Final = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT: Final = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2


def ioc(direction: int, type_: int, nr: int, size: int) -> int:
    """Linux ``_IOC(dir, type, nr, size)`` = ``dir << 30 | size << 16 | type << 8 | nr``."""
    return (
        (direction << _IOC_DIRSHIFT)
        | (size << _IOC_SIZESHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
    )


class _Iovec(ctypes.Structure):
    """``struct nsm_iovec { __u64 addr; __u64 len; }`` (include/uapi/linux/nsm.h)."""

    _fields_ = (("iov_base", ctypes.c_uint64), ("iov_len", ctypes.c_uint64))


class _NsmMessage(ctypes.Structure):
    """``struct nsm_raw { struct nsm_iovec request; struct nsm_iovec response; }``: 32 bytes."""

    _fields_ = (("request", _Iovec), ("response", _Iovec))


NSM_MAGIC: Final = 0x0A
NSM_IOCTL_RAW: Final = ioc(_IOC_READ | _IOC_WRITE, NSM_MAGIC, 0, ctypes.sizeof(_NsmMessage))
"""``_IOWR(0x0A, 0, struct nsm_raw)`` = ``0xC0200A00``."""


# -- the Nsm protocol and the typed client ---------------------------------------------------------


class Nsm(Protocol):
    """Anything that answers NSM requests: raw CBOR in, raw CBOR out."""

    def process(self, request: bytes) -> bytes:
        """Send one encoded request and return the encoded response."""
        ...


@dataclass(frozen=True, slots=True)
class PcrState:
    """One PCR as :meth:`NsmClient.describe_pcr` reports it."""

    locked: bool
    value: bytes


_ResponseT = TypeVar(
    "_ResponseT",
    DescribePcrResponse,
    ExtendPcrResponse,
    LockPcrResponse,
    LockPcrsResponse,
    DescribeNsmResponse,
    AttestationResponse,
    GetRandomResponse,
)


class NsmClient:
    """Typed calls over any :class:`Nsm` (the device or the emulator).

    An ``Error`` response raises ``NsmError(code=<ErrorCode>)``; a response of another variant than
    the request's raises ``NsmError(code="InvalidResponse")``.
    """

    def __init__(self, nsm: Nsm) -> None:
        self._nsm = nsm

    def _call(self, request: Request, expected: type[_ResponseT]) -> _ResponseT:
        # (1) encode and enforce the driver's request limit (src/driver/mod.rs).
        encoded = encode_request(request)
        if len(encoded) > NSM_REQUEST_MAX_SIZE:
            raise NsmError(
                f"request is {len(encoded)} bytes; the NSM accepts at most {NSM_REQUEST_MAX_SIZE}",
                code="InputTooLarge",
            )
        # (2) exchange, (3) decode strictly, (4) map Error and check the variant.
        response = decode_response(self._nsm.process(encoded))
        if isinstance(response, ErrorResponse):
            raise NsmError(
                f"the NSM answered {type(request).__name__} with Error {response.code}",
                code=response.code,
            )
        if not isinstance(response, expected):
            raise NsmError(
                f"the NSM answered {type(request).__name__} with {type(response).__name__}",
                code="InvalidResponse",
            )
        return response

    def attestation(
        self,
        *,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes:
        """A signed attestation document (untagged COSE_Sign1 bytes) binding the three fields."""
        request = AttestationRequest(user_data=user_data, nonce=nonce, public_key=public_key)
        return self._call(request, AttestationResponse).document

    def describe_pcr(self, index: int) -> PcrState:
        """The value and lock state of PCR ``index``."""
        response = self._call(DescribePcrRequest(index=index), DescribePcrResponse)
        return PcrState(locked=response.lock, value=response.data)

    def extend_pcr(self, index: int, data: bytes) -> bytes:
        """Extend PCR ``index`` with ``data``; return its new value."""
        return self._call(ExtendPcrRequest(index=index, data=data), ExtendPcrResponse).data

    def lock_pcr(self, index: int) -> None:
        """Make PCR ``index`` read-only."""
        self._call(LockPcrRequest(index=index), LockPcrResponse)

    def lock_pcrs(self, range_: int) -> None:
        """Make PCRs ``[0, range_)`` read-only."""
        self._call(LockPcrsRequest(range=range_), LockPcrsResponse)

    def describe_nsm(self) -> NsmDescription:
        """The module's version, id, PCR count, locked PCRs and digest."""
        return self._call(DescribeNsmRequest(), DescribeNsmResponse)

    def get_random(self) -> bytes:
        """Random bytes from the module (256 per call on Nitro)."""
        return self._call(GetRandomRequest(), GetRandomResponse).random


# -- the real device ---------------------------------------------------------------------------


class IoctlFunction(Protocol):
    """The shape of ``fcntl.ioctl`` as :class:`NsmDevice` calls it."""

    def __call__(
        self, fd: int, request: int, arg: ctypes.Structure, mutate_flag: bool, /
    ) -> int: ...


def _fcntl_ioctl(fd: int, request: int, arg: ctypes.Structure, mutate_flag: bool, /) -> int:
    return int(fcntl.ioctl(fd, request, arg, mutate_flag))


class NsmDevice:
    """The Nitro Security Module through ``/dev/nsm`` (only inside a Nitro enclave).

    The device is opened lazily (``O_RDWR | O_CLOEXEC``) at the first request and closed by
    :meth:`close` or the context manager. ``ioctl`` is injectable so that the byte-level exchange
    can be tested without the device. Safe to share between threads; requests are serialized, as
    the driver serializes them anyway.
    """

    def __init__(self, path: str = "/dev/nsm", *, ioctl: IoctlFunction = _fcntl_ioctl) -> None:
        self._path = path
        self._ioctl = ioctl
        self._fd: int | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> NsmDevice:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _descriptor(self) -> int:
        """The open device; call with ``self._lock`` held."""
        if self._fd is None:
            try:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise NsmTransportError(
                    f"cannot open {self._path}: {exc.strerror}; is this a Nitro enclave?"
                ) from exc
        return self._fd

    def close(self) -> None:
        """Close the device if it is open; idempotent."""
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def process(self, request: bytes) -> bytes:
        """Send one encoded request through ``NSM_IOCTL_RAW``; return the raw response bytes.

        The response comes from the device driver and is not parsed here (see
        :func:`decode_response`); only its reported length is checked against the buffer.
        """
        # (1) the driver's request limit, checked before the kernel sees it (src/driver/mod.rs).
        if len(request) > NSM_REQUEST_MAX_SIZE:
            raise NsmError(
                f"request is {len(request)} bytes; the NSM accepts at most {NSM_REQUEST_MAX_SIZE}",
                code="InputTooLarge",
            )
        # (2) the message: two iovecs pointing at our request and response buffers.
        request_buffer = ctypes.create_string_buffer(request, len(request))
        response_buffer = ctypes.create_string_buffer(NSM_RESPONSE_MAX_SIZE)
        message = _NsmMessage()
        message.request.iov_base = ctypes.addressof(request_buffer)
        message.request.iov_len = len(request)
        message.response.iov_base = ctypes.addressof(response_buffer)
        message.response.iov_len = NSM_RESPONSE_MAX_SIZE
        # (3) the ioctl; the kernel writes the response and rewrites response.iov_len. The lock
        # keeps close() from releasing the descriptor under a running request.
        try:
            with self._lock:
                status = self._ioctl(self._descriptor(), NSM_IOCTL_RAW, message, True)
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                raise NsmError(
                    "the NSM driver refused the request as too large", code="InputTooLarge"
                ) from exc
            raise NsmTransportError(f"NSM ioctl failed: {exc.strerror}") from exc
        if status != 0:
            raise NsmTransportError(f"NSM ioctl returned {status}")
        # (4) the reported length must fit the buffer we lent: beyond it the response was cut.
        length = message.response.iov_len
        if length > NSM_RESPONSE_MAX_SIZE:
            raise NsmError(
                f"the NSM reports a {length}-byte response; "
                f"the buffer holds {NSM_RESPONSE_MAX_SIZE}",
                code="BufferTooSmall",
            )
        if length == 0:
            raise NsmError("the NSM returned an empty response", code="InvalidResponse")
        return ctypes.string_at(response_buffer, length)
