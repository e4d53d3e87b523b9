"""Typed, length-prefixed frames between the parent and the enclave (vsock, or unix locally).

Wire format (all integers big-endian)::

    frame   = header payload
    header  = magic     2 bytes   b"NF" (0x4E 0x46)
              version   u8        1
              type      u8        a FrameType value
              stream_id u32       which request or stream the frame belongs to (0 = none)
              length    u32       payload length in bytes, at most the connection's max_payload
    payload = length bytes, whose layout depends on the type

A reader checks the header in that order (magic, version, type, length) and refuses a bad one with
:class:`~protocol.errors.FrameError` *before* reading a single payload byte, so a hostile length
never makes it allocate or wait. The default maximum payload, 16 MiB + 64 bytes, holds a 16 MiB
sealed chunk with its fields.

Structured payloads (CBOR is deterministic on the way out and decoded strictly on the way in: one
item that fills the payload, a map with exactly the listed text keys, no tags, no floats)::

    ERROR           {"code": text, "message": text}
    BUNDLE_REQUEST  {"bundle": text, "from_chunk": uint}
    BUNDLE_MANIFEST the manifest bytes, verbatim
    BUNDLE_CHUNK    index u64 ‖ sealed chunk bytes (ciphertext ‖ 16-byte tag), verbatim
    BUNDLE_END      {"chunk_count": uint}

End of stream: a connection that ends exactly between two frames raises :class:`ConnectionClosed`
(a :class:`~protocol.errors.TransportError`), one that ends inside a frame raises a plain
``TransportError`` ("truncated"). Both fail closed for callers that catch only ``TransportError``;
a server that treats a clean hang-up as normal catches ``ConnectionClosed``.

Deadlines: :func:`read_frame` takes one deadline for the whole frame (header and payload), so a
peer that trickles bytes cannot hold a reader forever. The blocking :func:`recv_frame` does the same
when given ``timeout``, else uses the socket's own timeout per receive, and refuses a socket that
has none.
"""

from __future__ import annotations

import asyncio
import enum
import re
import socket
import struct
import time
from dataclasses import dataclass
from typing import Final

from protocol._cbor import CborRejected, canonical_dumps, strict_loads
from protocol.errors import ConfigError, FrameError, TransportError
from protocol.transport import check_timeout

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "HEADER_SIZE",
    "MAGIC",
    "VERSION",
    "BundleChunk",
    "BundleEnd",
    "BundleRequest",
    "ConnectionClosed",
    "ErrorPayload",
    "Frame",
    "FrameType",
    "decode_header",
    "encode_frame",
    "read_frame",
    "recv_frame",
    "send_frame",
    "write_frame",
]

MAGIC: Final = b"NF"
VERSION: Final = 1
HEADER_SIZE: Final = 12
DEFAULT_MAX_PAYLOAD: Final = 16 * 1024 * 1024 + 64
U32_MAX: Final = 0xFFFF_FFFF
U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF
_HEADER: Final = struct.Struct(">2sBBII")
_CHUNK_INDEX: Final = struct.Struct(">Q")
MAX_SMALL_PAYLOAD: Final = 4096  # the CBOR payloads are tiny; bound them before decoding
MAX_ERROR_CODE: Final = 64
MAX_ERROR_MESSAGE: Final = 1024
MAX_BUNDLE_NAME: Final = 256
_ERROR_CODE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*", re.ASCII)
_BUNDLE_NAME = re.compile(r"[\x21-\x7e]+", re.ASCII)  # printable ASCII, no space


class FrameType(enum.IntEnum):
    """The frame types; the number is the ``type`` byte of the header."""

    HEALTH_PING = 1
    HEALTH_PONG = 2
    ERROR = 3
    ATTESTATION_REQUEST = 16
    ATTESTATION_RESPONSE = 17
    INFER_REQUEST = 32
    INFER_RESPONSE_CHUNK = 33
    INFER_RESPONSE_END = 34
    BUNDLE_REQUEST = 48
    BUNDLE_MANIFEST = 49
    BUNDLE_CHUNK = 50
    BUNDLE_END = 51
    KMS_RELAY_OPEN = 64
    KMS_RELAY_DATA = 65
    KMS_RELAY_CLOSE = 66
    CREDENTIALS = 80


_TYPES: Final = {int(t): t for t in FrameType}


class ConnectionClosed(TransportError):
    """The peer closed the connection cleanly, exactly between two frames."""

    def __init__(self, message: str = "connection closed") -> None:
        super().__init__(message)


@dataclass(frozen=True)
class Frame:
    """One frame. ``payload`` is opaque here; its layout depends on ``type``."""

    type: FrameType
    stream_id: int
    payload: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.type, FrameType):
            raise FrameError(f"frame type must be a FrameType, not {type(self.type).__name__}")
        if type(self.stream_id) is not int or not 0 <= self.stream_id <= U32_MAX:
            raise FrameError("stream_id must be a u32")
        if type(self.payload) is not bytes:
            raise FrameError(f"payload must be bytes, not {type(self.payload).__name__}")


def encode_frame(frame: Frame, *, max_payload: int = DEFAULT_MAX_PAYLOAD) -> bytes:
    """Header ‖ payload. Refuses a payload the peer would refuse (over ``max_payload``)."""
    return _header(frame, max_payload) + frame.payload


def _header(frame: Frame, max_payload: int) -> bytes:
    _check_max_payload(max_payload)
    if len(frame.payload) > max_payload:
        raise FrameError(
            f"{frame.type.name} payload is {len(frame.payload)} bytes; the maximum is {max_payload}"
        )
    return _HEADER.pack(MAGIC, VERSION, frame.type, frame.stream_id, len(frame.payload))


def decode_header(
    header: bytes, *, max_payload: int = DEFAULT_MAX_PAYLOAD
) -> tuple[FrameType, int, int]:
    """Check a 12-byte header (untrusted: it comes from the other side of the transport) and return
    ``(type, stream_id, payload_length)``. Raises only :class:`FrameError`."""
    _check_max_payload(max_payload)
    if len(header) != HEADER_SIZE:
        raise FrameError(f"a frame header is {HEADER_SIZE} bytes, not {len(header)}")
    magic, version, type_byte, stream_id, length = _HEADER.unpack(header)
    # (1) magic, (2) version, (3) a known type, (4) a length within the limit, in that order
    if magic != MAGIC:
        raise FrameError("bad frame magic; expected b'NF'")
    if version != VERSION:
        raise FrameError(f"frame version {version} is not supported; expected {VERSION}")
    frame_type = _TYPES.get(type_byte)
    if frame_type is None:
        raise FrameError(f"unknown frame type {type_byte}")
    if length > max_payload:
        raise FrameError(
            f"{frame_type.name} payload is {length} bytes; the maximum is {max_payload}"
        )
    return frame_type, stream_id, length


def _check_max_payload(max_payload: int) -> None:
    if type(max_payload) is not int or not 0 <= max_payload <= U32_MAX:
        raise ConfigError("max_payload must be an integer in 0..2**32-1")


# -- asyncio -----------------------------------------------------------------------------------


async def read_frame(
    reader: asyncio.StreamReader, *, max_payload: int = DEFAULT_MAX_PAYLOAD, timeout: float
) -> Frame:
    """Read one frame (untrusted: it comes from the other side of the transport) within
    ``timeout`` seconds for the whole frame.

    Raises :class:`FrameError` for a bad header, before reading its payload;
    :class:`ConnectionClosed` on a clean end between frames; :class:`TransportError` on a
    truncated frame, a reset or the deadline.
    """
    check_timeout(timeout)
    _check_max_payload(max_payload)
    try:
        async with asyncio.timeout(timeout):
            try:
                header = await reader.readexactly(HEADER_SIZE)
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:
                    raise ConnectionClosed() from None
                raise TransportError(
                    f"connection closed inside a frame header ({len(exc.partial)} of "
                    f"{HEADER_SIZE} bytes)"
                ) from None
            frame_type, stream_id, length = decode_header(header, max_payload=max_payload)
            try:
                payload = await reader.readexactly(length) if length else b""
            except asyncio.IncompleteReadError as exc:
                raise TransportError(
                    f"connection closed inside a {frame_type.name} payload "
                    f"({len(exc.partial)} of {length} bytes)"
                ) from None
    except TimeoutError:
        raise TransportError(f"no complete frame within {timeout} s") from None
    except OSError as exc:
        raise TransportError(f"read failed: {exc.strerror or type(exc).__name__}") from None
    return Frame(frame_type, stream_id, payload)


async def write_frame(
    writer: asyncio.StreamWriter,
    frame: Frame,
    *,
    timeout: float,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
) -> None:
    """Write one frame and wait (``drain()``, at most ``timeout`` seconds) until the transport's
    buffer is below its high-water mark: a slow reader slows the writer down instead of growing
    its memory. Raises :class:`TransportError` on a reset peer or the deadline."""
    check_timeout(timeout)
    header = _header(frame, max_payload)
    try:
        async with asyncio.timeout(timeout):
            writer.write(header)
            if frame.payload:
                writer.write(frame.payload)
            await writer.drain()
    except TimeoutError:
        raise TransportError(
            f"peer did not take a {frame.type.name} frame within {timeout} s"
        ) from None
    except OSError as exc:  # ConnectionResetError, BrokenPipeError
        raise TransportError(f"write failed: {exc.strerror or type(exc).__name__}") from None


# -- blocking ----------------------------------------------------------------------------------


def recv_frame(
    sock: socket.socket, *, max_payload: int = DEFAULT_MAX_PAYLOAD, timeout: float | None = None
) -> Frame:
    """Blocking :func:`read_frame` (``sock`` carries untrusted bytes from the other side).

    With ``timeout``, one deadline covers the whole frame; without, the socket's own timeout
    bounds each receive, and a socket without one is refused (:class:`ConfigError`). Same errors
    as :func:`read_frame`.
    """
    _check_max_payload(max_payload)
    deadline = _deadline(sock, timeout)
    header = _recv_exactly(sock, HEADER_SIZE, deadline, what="frame header", at_boundary=True)
    frame_type, stream_id, length = decode_header(header, max_payload=max_payload)
    payload = _recv_exactly(sock, length, deadline, what=f"{frame_type.name} payload")
    return Frame(frame_type, stream_id, payload)


def send_frame(
    sock: socket.socket,
    frame: Frame,
    *,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    timeout: float | None = None,
) -> None:
    """Blocking :func:`write_frame`; the same deadline rules as :func:`recv_frame`."""
    header = _header(frame, max_payload)
    deadline = _deadline(sock, timeout)
    try:
        for part in (header, frame.payload):
            if deadline is not None:
                sock.settimeout(_remaining(deadline))
            if part:
                sock.sendall(part)
    except TimeoutError:
        raise TransportError(f"peer did not take a {frame.type.name} frame in time") from None
    except OSError as exc:
        raise TransportError(f"send failed: {exc.strerror or type(exc).__name__}") from None
    finally:
        if deadline is not None:
            sock.settimeout(deadline[1])


# (monotonic deadline, the socket's own timeout to restore), or None: use the socket's timeout
_Deadline = tuple[float, float | None] | None


def _deadline(sock: socket.socket, timeout: float | None) -> _Deadline:
    if timeout is not None:
        check_timeout(timeout)
        return time.monotonic() + timeout, sock.gettimeout()
    own = sock.gettimeout()
    if own is None or own <= 0:
        raise ConfigError(
            "the socket has no timeout: pass timeout= or call settimeout() so that reads end"
        )
    return None


def _remaining(deadline: tuple[float, float | None]) -> float:
    left = deadline[0] - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _recv_exactly(
    sock: socket.socket, size: int, deadline: _Deadline, *, what: str, at_boundary: bool = False
) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    try:
        while got < size:
            if deadline is not None:
                sock.settimeout(_remaining(deadline))
            n = sock.recv_into(view[got:], size - got)
            if n == 0:
                if at_boundary and got == 0:
                    raise ConnectionClosed()
                raise TransportError(f"connection closed inside a {what} ({got} of {size} bytes)")
            got += n
    except TimeoutError:
        raise TransportError(f"no complete {what} in time") from None
    except OSError as exc:
        raise TransportError(f"receive failed: {exc.strerror or type(exc).__name__}") from None
    finally:
        view.release()
        if deadline is not None:
            sock.settimeout(deadline[1])
    return bytes(buffer)


# -- structured payloads -----------------------------------------------------------------------


def _decode_map(payload: bytes, kind: str, keys: frozenset[str]) -> dict[str, object]:
    """A CBOR map with exactly ``keys`` (untrusted bytes); raises only :class:`FrameError`."""
    if type(payload) is not bytes:
        raise FrameError(f"{kind} payload must be bytes")
    if len(payload) > MAX_SMALL_PAYLOAD:
        raise FrameError(
            f"{kind} payload is {len(payload)} bytes; the maximum is {MAX_SMALL_PAYLOAD}"
        )
    try:
        value = strict_loads(payload, max_depth=1)
    except CborRejected as exc:
        raise FrameError(f"{kind} payload: {exc}") from None
    if not isinstance(value, dict):
        raise FrameError(f"{kind} payload must be a CBOR map")
    missing = keys - value.keys()
    if missing:
        raise FrameError(f"{kind} payload lacks {', '.join(sorted(missing))}")
    unknown = value.keys() - keys
    if unknown:
        raise FrameError(f"{kind} payload has {len(unknown)} unknown field(s)")
    return value


def _check_text(value: object, field: str, pattern: re.Pattern[str] | None, limit: int) -> str:
    if type(value) is not str:
        raise FrameError(f"{field} must be a text string")
    if len(value) > limit:
        raise FrameError(f"{field} is {len(value)} characters; the maximum is {limit}")
    if pattern is not None and not pattern.fullmatch(value):
        raise FrameError(f"{field} must match {pattern.pattern}")
    return value


def _check_uint(value: object, field: str) -> int:
    if type(value) is not int or not 0 <= value <= U64_MAX:
        raise FrameError(f"{field} must be an unsigned integer (u64)")
    return value


@dataclass(frozen=True)
class ErrorPayload:
    """ERROR payload: a machine-readable ``code`` (``UnknownBundle``) and a short message.

    Neither carries content or secrets; both are public data that crosses the parent.
    """

    code: str
    message: str

    def __post_init__(self) -> None:
        _check_text(self.code, "error code", _ERROR_CODE, MAX_ERROR_CODE)
        _check_text(self.message, "error message", None, MAX_ERROR_MESSAGE)

    def encode(self) -> bytes:
        return canonical_dumps({"code": self.code, "message": self.message})

    @classmethod
    def decode(cls, payload: bytes) -> ErrorPayload:
        """Parse an ERROR payload (untrusted). Raises only :class:`FrameError`."""
        value = _decode_map(payload, "ERROR", frozenset({"code", "message"}))
        return cls(code=value["code"], message=value["message"])  # type: ignore[arg-type]

    def frame(self, stream_id: int = 0) -> Frame:
        return Frame(FrameType.ERROR, stream_id, self.encode())


@dataclass(frozen=True)
class BundleRequest:
    """BUNDLE_REQUEST payload: which bundle, and the first chunk wanted (0, or later to resume)."""

    bundle: str
    from_chunk: int = 0

    def __post_init__(self) -> None:
        _check_text(self.bundle, "bundle", _BUNDLE_NAME, MAX_BUNDLE_NAME)
        _check_uint(self.from_chunk, "from_chunk")

    def encode(self) -> bytes:
        return canonical_dumps({"bundle": self.bundle, "from_chunk": self.from_chunk})

    @classmethod
    def decode(cls, payload: bytes) -> BundleRequest:
        """Parse a BUNDLE_REQUEST payload (untrusted). Raises only :class:`FrameError`."""
        value = _decode_map(payload, "BUNDLE_REQUEST", frozenset({"bundle", "from_chunk"}))
        return cls(bundle=value["bundle"], from_chunk=value["from_chunk"])  # type: ignore[arg-type]

    def frame(self, stream_id: int = 0) -> Frame:
        return Frame(FrameType.BUNDLE_REQUEST, stream_id, self.encode())


@dataclass(frozen=True)
class BundleChunk:
    """BUNDLE_CHUNK payload: ``index`` u64 ‖ ``sealed`` (ciphertext ‖ tag, verbatim)."""

    index: int
    sealed: bytes

    def __post_init__(self) -> None:
        _check_uint(self.index, "chunk index")
        if type(self.sealed) is not bytes:
            raise FrameError("sealed chunk must be bytes")

    def encode(self) -> bytes:
        return _CHUNK_INDEX.pack(self.index) + self.sealed

    @classmethod
    def decode(cls, payload: bytes) -> BundleChunk:
        """Parse a BUNDLE_CHUNK payload (untrusted). Raises only :class:`FrameError`; the sealed
        bytes are authenticated later, by the enclave's AEAD."""
        if type(payload) is not bytes:
            raise FrameError("BUNDLE_CHUNK payload must be bytes")
        if len(payload) < _CHUNK_INDEX.size:
            raise FrameError(f"BUNDLE_CHUNK payload is {len(payload)} bytes; the index alone is 8")
        (index,) = _CHUNK_INDEX.unpack_from(payload)
        return cls(index=index, sealed=payload[_CHUNK_INDEX.size :])

    def frame(self, stream_id: int = 0) -> Frame:
        return Frame(FrameType.BUNDLE_CHUNK, stream_id, self.encode())


@dataclass(frozen=True)
class BundleEnd:
    """BUNDLE_END payload: how many chunks the bundle has (the receiver checks it got them all)."""

    chunk_count: int

    def __post_init__(self) -> None:
        _check_uint(self.chunk_count, "chunk_count")

    def encode(self) -> bytes:
        return canonical_dumps({"chunk_count": self.chunk_count})

    @classmethod
    def decode(cls, payload: bytes) -> BundleEnd:
        """Parse a BUNDLE_END payload (untrusted). Raises only :class:`FrameError`."""
        value = _decode_map(payload, "BUNDLE_END", frozenset({"chunk_count"}))
        return cls(chunk_count=value["chunk_count"])  # type: ignore[arg-type]

    def frame(self, stream_id: int = 0) -> Frame:
        return Frame(FrameType.BUNDLE_END, stream_id, self.encode())
