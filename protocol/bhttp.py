"""RFC 9292 Binary HTTP, known-length form: the plaintext inside an Oblivious HTTP message.

Only what the request path needs, strictly:

- framing indicators 0 (known-length request) and 1 (known-length response); the
  indeterminate-length forms (2, 3) are refused;
- informational (1xx) responses are refused: the enclave never sends them;
- RFC 9292 §3.8 truncation is accepted (a message may end right after its control data, its
  header section or its content: what is missing is empty), and so is padding with zero bytes
  after the trailer section; any other trailing byte is refused. The encoder writes the shortest
  form: it truncates empty trailing sections (which is how RFC 9458 Appendix A spells its
  messages);
- field names are lowercase tokens (RFC 9292 §3.6, RFC 9110 §5.1), field values visible ASCII,
  space and tab without leading or trailing whitespace (RFC 9110 §5.5, obs-text refused);
  pseudo-fields are not fields;
- every length is checked against what remains before anything is sliced, and against caps.

Variable-length integers are QUIC's (RFC 9000 §16): the two high bits of the first byte give the
length (1, 2, 4 or 8 bytes). Non-shortest encodings are accepted when decoding, as RFC 9000 §16
allows; the encoder always writes the shortest.

Every rule broken is a :class:`MalformedMessage` naming the field and the rule; messages never
quote content.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from protocol.errors import MalformedMessage

__all__ = [
    "MAX_FIELDS",
    "MAX_FIELD_SECTION_SIZE",
    "MAX_MESSAGE_SIZE",
    "PAD_MIN",
    "PAD_STEP",
    "VARINT_MAX",
    "Request",
    "Response",
    "decode_request",
    "decode_response",
    "decode_varint",
    "encode_request",
    "encode_response",
    "encode_varint",
    "pad",
    "padded_size",
]

VARINT_MAX: Final = (1 << 62) - 1
MAX_MESSAGE_SIZE: Final = 17 * 1024 * 1024  # a 16 MiB inference body plus headers
MAX_FIELD_SECTION_SIZE: Final = 64 * 1024  # encoded header (or trailer) section
MAX_FIELDS: Final = 256  # field lines per section
MAX_CONTROL_SIZE: Final = 8 * 1024  # each of method, scheme, authority, path

_KNOWN_LENGTH_REQUEST: Final = 0
_KNOWN_LENGTH_RESPONSE: Final = 1
_INDETERMINATE: Final = frozenset({2, 3})

_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_NAME: Final = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")
_FIELD_VALUE: Final = re.compile(r"(?:[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?)?")
_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_VISIBLE: Final = re.compile(r"[\x21-\x7e]*")

Fields = tuple[tuple[str, str], ...]


# --- QUIC variable-length integers, RFC 9000 §16 -------------------------------------------------


def encode_varint(value: int) -> bytes:
    """The shortest RFC 9000 §16 encoding of ``value`` (0 ≤ value < 2^62)."""
    if type(value) is not int or not 0 <= value <= VARINT_MAX:
        raise MalformedMessage("a variable-length integer must be in 0..2^62-1")
    if value < 1 << 6:
        return value.to_bytes(1, "big")
    if value < 1 << 14:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 1 << 30:
        return (value | 0x8000_0000).to_bytes(4, "big")
    return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")


def decode_varint(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int] | None:
    """``(value, next_offset)`` for the varint at ``offset``, or ``None`` if ``data`` ends first."""
    if offset >= len(data):
        return None
    size = 1 << (data[offset] >> 6)
    if offset + size > len(data):
        return None
    value = int.from_bytes(data[offset : offset + size], "big") & ((1 << (8 * size - 2)) - 1)
    return value, offset + size


# --- Messages -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A Binary HTTP request: control data, header fields, content and trailer fields.

    Field names are lowercase; field values are text (visible ASCII, space and tab).
    """

    method: str
    scheme: str
    authority: str
    path: str
    headers: Fields = ()
    content: bytes = b""
    trailers: Fields = ()

    def header(self, name: str) -> str | None:
        """The value of the one header field ``name``; ``None`` if absent.

        Raises :class:`MalformedMessage` if the field appears more than once.
        """
        return _single(self.headers, name)


@dataclass(frozen=True)
class Response:
    """A Binary HTTP final response: status, header fields, content and trailer fields."""

    status: int
    headers: Fields = ()
    content: bytes = b""
    trailers: Fields = ()

    def header(self, name: str) -> str | None:
        """The value of the one header field ``name``; ``None`` if absent (twice: refused)."""
        return _single(self.headers, name)


def _single(fields: Fields, name: str) -> str | None:
    values = [value for key, value in fields if key == name]
    if len(values) > 1:
        raise MalformedMessage(f"header field {name!r} appears {len(values)} times")
    return values[0] if values else None


# --- Encoding -------------------------------------------------------------------------------------


def _text(
    value: object,
    what: str,
    pattern: re.Pattern[str],
    *,
    empty: bool = False,
    limit: int = MAX_FIELD_SECTION_SIZE,
) -> bytes:
    if type(value) is not str:
        raise MalformedMessage(f"{what} must be text")
    if len(value) > limit:
        raise MalformedMessage(f"{what} is longer than {limit} bytes")
    if (not value and not empty) or not pattern.fullmatch(value):
        raise MalformedMessage(f"{what} breaks its syntax rule")
    return value.encode("ascii")


def _prefixed(data: bytes) -> bytes:
    return encode_varint(len(data)) + data


def _encode_fields(fields: object, what: str) -> bytes:
    if not isinstance(fields, tuple | list):
        raise MalformedMessage(f"{what} must be a sequence of (name, value) pairs")
    if len(fields) > MAX_FIELDS:
        raise MalformedMessage(f"{what} has more than {MAX_FIELDS} fields")
    out = bytearray()
    for i, line in enumerate(fields):
        if not isinstance(line, tuple | list) or len(line) != 2:
            raise MalformedMessage(f"{what}[{i}] must be a (name, value) pair")
        name, value = line
        out += _prefixed(_text(name, f"{what}[{i}] name", _FIELD_NAME))
        out += _prefixed(_text(value, f"{what}[{i}] value", _FIELD_VALUE, empty=True))
    if len(out) > MAX_FIELD_SECTION_SIZE:
        raise MalformedMessage(f"{what} is larger than {MAX_FIELD_SECTION_SIZE} bytes")
    return bytes(out)


def _encode_tail(headers: object, content: object, trailers: object) -> bytes:
    if type(content) is not bytes:
        raise MalformedMessage("content must be bytes")
    sections = [
        _prefixed(_encode_fields(headers, "headers")),
        _prefixed(content),
        _prefixed(_encode_fields(trailers, "trailers")),
    ]
    # RFC 9292 §3.8: empty trailing sections may be truncated; write the shortest form.
    while sections and sections[-1] == b"\x00":
        sections.pop()
    return b"".join(sections)


def _check_size(message: bytes) -> bytes:
    if len(message) > MAX_MESSAGE_SIZE:
        raise MalformedMessage(f"message is larger than {MAX_MESSAGE_SIZE} bytes")
    return message


def encode_request(request: Request) -> bytes:
    """The known-length Binary HTTP encoding (RFC 9292 §3) of ``request``, shortest form."""
    control = (
        _prefixed(_text(request.method, "method", _TOKEN, limit=MAX_CONTROL_SIZE))
        + _prefixed(_text(request.scheme, "scheme", _SCHEME, limit=MAX_CONTROL_SIZE))
        + _prefixed(
            _text(request.authority, "authority", _VISIBLE, empty=True, limit=MAX_CONTROL_SIZE)
        )
        + _prefixed(_text(request.path, "path", _VISIBLE, empty=True, limit=MAX_CONTROL_SIZE))
    )
    tail = _encode_tail(request.headers, request.content, request.trailers)
    return _check_size(encode_varint(_KNOWN_LENGTH_REQUEST) + control + tail)


def encode_response(response: Response) -> bytes:
    """The known-length Binary HTTP encoding of a final ``response`` (status 200..599)."""
    status = response.status
    if type(status) is not int or not 200 <= status <= 599:
        raise MalformedMessage("status must be a final status code, 200..599")
    tail = _encode_tail(response.headers, response.content, response.trailers)
    return _check_size(encode_varint(_KNOWN_LENGTH_RESPONSE) + encode_varint(status) + tail)


PAD_MIN: Final = 512  # the smallest padded size
PAD_STEP: Final = 64 * 1024  # above this, sizes round up to a multiple of it


def padded_size(size: int, *, limit: int = MAX_MESSAGE_SIZE) -> int:
    """The size :func:`pad` pads a ``size``-byte message to: the next power of two from 512 bytes
    up to 64 KiB, then the next multiple of 64 KiB, never above ``limit``."""
    if size > limit:
        raise MalformedMessage(f"message is larger than {limit} bytes")
    if size <= PAD_STEP:
        bucket = max(PAD_MIN, 1 << max(size - 1, 0).bit_length())
    else:
        bucket = -(-size // PAD_STEP) * PAD_STEP
    return min(bucket, limit)


def pad(message: bytes, *, limit: int = MAX_MESSAGE_SIZE) -> bytes:
    """``message`` followed by zero bytes up to :func:`padded_size` (RFC 9292 §3.8 padding).

    Encrypted, a message's length is the one thing an observer still sees: padded, it reveals only
    its size class (at most a factor of two, or 64 KiB, above the true length). Decoders here
    accept the zeros as padding.
    """
    return message + bytes(padded_size(len(message), limit=limit) - len(message))


# --- Decoding -------------------------------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def at_end(self) -> bool:
        return self.pos == len(self.data)

    def varint(self, what: str) -> int:
        decoded = decode_varint(self.data, self.pos)
        if decoded is None:
            raise MalformedMessage(f"{what}: truncated variable-length integer")
        value, self.pos = decoded
        return value

    def prefixed(self, what: str, limit: int) -> bytes:
        length = self.varint(f"{what} length")
        if length > limit:
            raise MalformedMessage(f"{what} is {length} bytes; the maximum is {limit}")
        if length > len(self.data) - self.pos:
            raise MalformedMessage(f"{what} is longer than the rest of the message")
        value = self.data[self.pos : self.pos + length]
        self.pos += length
        return value


def _decode_text(raw: bytes, what: str, pattern: re.Pattern[str], *, empty: bool = False) -> str:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedMessage(f"{what} is not ASCII") from None
    if (not text and not empty) or not pattern.fullmatch(text):
        raise MalformedMessage(f"{what} breaks its syntax rule")
    return text


def _decode_fields(reader: _Reader, what: str) -> Fields:
    if reader.at_end:  # RFC 9292 §3.8 truncation: the section is empty
        return ()
    section = _Reader(reader.prefixed(f"{what} section", MAX_FIELD_SECTION_SIZE))
    fields: list[tuple[str, str]] = []
    while not section.at_end:
        if len(fields) == MAX_FIELDS:
            raise MalformedMessage(f"{what} has more than {MAX_FIELDS} fields")
        i = len(fields)
        name = _decode_text(
            section.prefixed(f"{what}[{i}] name", MAX_FIELD_SECTION_SIZE),
            f"{what}[{i}] name",
            _FIELD_NAME,
        )
        value = _decode_text(
            section.prefixed(f"{what}[{i}] value", MAX_FIELD_SECTION_SIZE),
            f"{what}[{i}] value",
            _FIELD_VALUE,
            empty=True,
        )
        fields.append((name, value))
    return tuple(fields)


def _decode_tail(reader: _Reader) -> tuple[Fields, bytes, Fields]:
    headers = _decode_fields(reader, "headers")
    content = b"" if reader.at_end else reader.prefixed("content", MAX_MESSAGE_SIZE)
    trailers = _decode_fields(reader, "trailers")
    # RFC 9292 §3.8: only zero bytes (padding) may follow the trailer section.
    if reader.data.count(0, reader.pos) != len(reader.data) - reader.pos:
        raise MalformedMessage("non-zero bytes after the end of the message")
    return headers, content, trailers


def _start(data: object, expected: int) -> _Reader:
    if type(data) is not bytes:
        raise MalformedMessage("a Binary HTTP message must be bytes")
    if len(data) > MAX_MESSAGE_SIZE:
        raise MalformedMessage(f"message is larger than {MAX_MESSAGE_SIZE} bytes")
    reader = _Reader(data)
    indicator = reader.varint("framing indicator")
    if indicator != expected:
        if indicator in _INDETERMINATE:
            raise MalformedMessage("indeterminate-length Binary HTTP is not supported")
        raise MalformedMessage(f"framing indicator is {indicator}; expected {expected}")
    return reader


def decode_request(data: bytes) -> Request:
    """Decode a known-length Binary HTTP request. ``data`` is untrusted (it comes from a client
    through the untrusted parent, once decapsulated)."""
    reader = _start(data, _KNOWN_LENGTH_REQUEST)
    method = _decode_text(reader.prefixed("method", MAX_CONTROL_SIZE), "method", _TOKEN)
    scheme = _decode_text(reader.prefixed("scheme", MAX_CONTROL_SIZE), "scheme", _SCHEME)
    authority = _decode_text(
        reader.prefixed("authority", MAX_CONTROL_SIZE), "authority", _VISIBLE, empty=True
    )
    path = _decode_text(reader.prefixed("path", MAX_CONTROL_SIZE), "path", _VISIBLE, empty=True)
    headers, content, trailers = _decode_tail(reader)
    return Request(method, scheme, authority, path, headers, content, trailers)


def decode_response(data: bytes) -> Response:
    """Decode a known-length Binary HTTP final response. ``data`` is untrusted (it comes from the
    server, once decapsulated). Informational (1xx) responses are refused."""
    reader = _start(data, _KNOWN_LENGTH_RESPONSE)
    status = reader.varint("status")
    if 100 <= status <= 199:
        raise MalformedMessage("informational (1xx) responses are not supported")
    if not 200 <= status <= 599:
        raise MalformedMessage(f"status {status} is not a final status code (200..599)")
    headers, content, trailers = _decode_tail(reader)
    return Response(status, headers, content, trailers)
