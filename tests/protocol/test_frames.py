"""Frames between parent and enclave: the wire format, hostile headers and payloads, deadlines.

Header = b"NF" ‖ version u8 ‖ type u8 ‖ stream_id u32 BE ‖ length u32 BE (12 bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Awaitable, Callable

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ConfigError, FrameError, TransportError
from protocol.frames import (
    DEFAULT_MAX_PAYLOAD,
    HEADER_SIZE,
    BundleChunk,
    BundleEnd,
    BundleRequest,
    ConnectionClosed,
    ErrorPayload,
    Frame,
    FrameType,
    decode_header,
    encode_frame,
    read_frame,
    recv_frame,
    send_frame,
    write_frame,
)


def header(
    type_: int, length: int, *, stream_id: int = 0, magic: bytes = b"NF", version: int = 1
) -> bytes:
    return struct.pack(">2sBBII", magic, version, type_, stream_id, length)


async def _read_bytes(data: bytes, *, eof: bool = True, max_payload: int = 1024) -> Frame:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return await read_frame(reader, max_payload=max_payload, timeout=0.2)


def read_bytes(data: bytes, *, eof: bool = True, max_payload: int = 1024) -> Frame:
    return asyncio.run(_read_bytes(data, eof=eof, max_payload=max_payload))


# -- the wire format ---------------------------------------------------------------------------


def test_header_layout_is_exact() -> None:
    frame = Frame(FrameType.BUNDLE_CHUNK, 0x01020304, b"xyz")
    assert encode_frame(frame) == bytes.fromhex("4e46 01 32 01020304 00000003") + b"xyz"


def test_frame_type_numbers_are_pinned() -> None:
    assert {t.name: int(t) for t in FrameType} == {
        "HEALTH_PING": 1,
        "HEALTH_PONG": 2,
        "ERROR": 3,
        "ATTESTATION_REQUEST": 16,
        "ATTESTATION_RESPONSE": 17,
        "INFER_REQUEST": 32,
        "INFER_RESPONSE_CHUNK": 33,
        "INFER_RESPONSE_END": 34,
        "BUNDLE_REQUEST": 48,
        "BUNDLE_MANIFEST": 49,
        "BUNDLE_CHUNK": 50,
        "BUNDLE_END": 51,
        "KMS_RELAY_OPEN": 64,
        "KMS_RELAY_DATA": 65,
        "KMS_RELAY_CLOSE": 66,
        "CREDENTIALS": 80,
    }


@pytest.mark.parametrize("frame_type", list(FrameType), ids=lambda t: t.name)
def test_round_trips_every_type(frame_type: FrameType) -> None:
    frame = Frame(frame_type, 7, bytes(range(int(frame_type))))
    data = encode_frame(frame)
    assert len(data) == HEADER_SIZE + len(frame.payload)
    assert read_bytes(data) == frame
    left, right = socket.socketpair()
    with left, right:
        left.settimeout(1.0)
        right.settimeout(1.0)
        send_frame(left, frame)
        assert recv_frame(right) == frame


def test_reads_consecutive_frames_then_a_clean_close() -> None:
    frames = [Frame(FrameType.HEALTH_PING, i, b"p" * i) for i in range(3)]

    async def run() -> list[Frame]:
        reader = asyncio.StreamReader()
        reader.feed_data(b"".join(encode_frame(f) for f in frames))
        reader.feed_eof()
        got = [await read_frame(reader, timeout=0.2) for _ in frames]
        with pytest.raises(ConnectionClosed, match="connection closed"):
            await read_frame(reader, timeout=0.2)
        return got

    assert asyncio.run(run()) == frames


def test_blocking_clean_close_between_frames() -> None:
    left, right = socket.socketpair()
    with left, right:
        right.settimeout(1.0)
        left.sendall(encode_frame(Frame(FrameType.HEALTH_PONG, 1, b"")))
        left.shutdown(socket.SHUT_WR)
        assert recv_frame(right).type is FrameType.HEALTH_PONG
        with pytest.raises(ConnectionClosed):
            recv_frame(right)


def test_payload_at_the_maximum_is_accepted() -> None:
    frame = Frame(FrameType.KMS_RELAY_DATA, 1, b"\x00" * 1024)
    assert read_bytes(encode_frame(frame), max_payload=1024) == frame


def test_encoder_refuses_what_the_peer_would_refuse() -> None:
    with pytest.raises(FrameError, match="maximum is 10"):
        encode_frame(Frame(FrameType.KMS_RELAY_DATA, 1, b"x" * 11), max_payload=10)


@pytest.mark.parametrize(
    ("type_", "stream_id", "payload"),
    [
        (3, 0, b""),  # a bare int, not a FrameType
        (FrameType.ERROR, -1, b""),
        (FrameType.ERROR, 2**32, b""),
        (FrameType.ERROR, True, b""),
        (FrameType.ERROR, 0, bytearray(b"x")),
        (FrameType.ERROR, 0, "text"),
    ],
)
def test_frame_rejects_bad_fields(type_: object, stream_id: object, payload: object) -> None:
    with pytest.raises(FrameError):
        Frame(type_, stream_id, payload)  # type: ignore[arg-type]


# -- hostile input -----------------------------------------------------------------------------

HOSTILE = [
    ("bad_magic", header(1, 0, magic=b"FN"), FrameError),
    ("zero_magic", bytes(12), FrameError),
    ("version_0", header(1, 0, version=0), FrameError),
    ("version_2", header(1, 0, version=2), FrameError),
    ("unknown_type_0", header(0, 0), FrameError),
    ("unknown_type_4", header(4, 0), FrameError),
    ("unknown_type_255", header(255, 0), FrameError),
    ("length_over_max", header(1, 1025), FrameError),
    ("length_u32_max", header(1, 2**32 - 1), FrameError),
    ("truncated_header", header(1, 0)[:5], TransportError),
    ("one_byte_header", b"N", TransportError),
    ("truncated_payload", header(1, 10) + b"abc", TransportError),
    ("empty_payload_missing", header(1, 1), TransportError),
]


@pytest.mark.parametrize(("data", "error"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_rejects_hostile_frame(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        read_bytes(data)
    left, right = socket.socketpair()
    with left, right:
        right.settimeout(1.0)
        left.sendall(data)
        left.shutdown(socket.SHUT_WR)
        with pytest.raises(error):
            recv_frame(right, max_payload=1024)


def test_truncation_is_not_mistaken_for_a_clean_close() -> None:
    with pytest.raises(TransportError) as caught:
        read_bytes(header(1, 0)[:5])
    assert not isinstance(caught.value, ConnectionClosed)


class _HeaderOnlyReader(asyncio.StreamReader):
    """Serves exactly one header; any further read fails the test."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.feed_data(data)
        self.reads: list[int] = []

    async def readexactly(self, n: int) -> bytes:
        self.reads.append(n)
        if len(self.reads) > 1:
            raise AssertionError(f"read {n} more bytes after a bad header")
        return await super().readexactly(n)


@pytest.mark.parametrize(
    "data",
    [header(1, 2**32 - 1), header(1, 1025), header(99, 5), header(1, 5, version=9)],
    ids=["u32_max", "max_plus_one", "unknown_type", "bad_version"],
)
def test_oversized_or_bad_header_fails_before_reading_the_payload(data: bytes) -> None:
    async def run() -> list[int]:
        reader = _HeaderOnlyReader(data)  # no EOF: a payload read would wait for the deadline
        with pytest.raises(FrameError):
            await read_frame(reader, max_payload=1024, timeout=5.0)
        return reader.reads

    start = time.monotonic()
    assert asyncio.run(run()) == [HEADER_SIZE]
    assert time.monotonic() - start < 1.0


def test_blocking_oversized_header_fails_before_reading_the_payload() -> None:
    left, right = socket.socketpair()
    with left, right:
        right.settimeout(5.0)  # the peer stays open: a payload read would wait for 5 s
        left.sendall(header(1, 2**31))
        start = time.monotonic()
        with pytest.raises(FrameError, match="maximum"):
            recv_frame(right)
        assert time.monotonic() - start < 1.0


def test_decode_header_checks_magic_first() -> None:
    with pytest.raises(FrameError, match="magic"):
        decode_header(header(99, 2**32 - 1, magic=b"XX", version=9))
    with pytest.raises(FrameError, match="12 bytes"):
        decode_header(b"NF\x01")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_raise_only_frame_or_transport_errors(data: bytes) -> None:
    try:
        frame = read_bytes(data, max_payload=32)
    except (FrameError, TransportError):
        return
    assert encode_frame(frame) == data[: HEADER_SIZE + len(frame.payload)]


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=2, max_size=40).map(lambda tail: b"NF\x01" + tail))
def test_near_valid_bytes_raise_only_frame_or_transport_errors(data: bytes) -> None:
    with contextlib.suppress(FrameError, TransportError):
        read_bytes(data, max_payload=32)


# -- deadlines ---------------------------------------------------------------------------------


async def _with_stalled_peer(
    sent: bytes, body: Callable[[asyncio.StreamReader], Awaitable[None]]
) -> None:
    left, right = socket.socketpair()
    with right:
        right.sendall(sent)  # then stalls, connection open
        reader, writer = await asyncio.open_connection(sock=left)
        try:
            await body(reader)
        finally:
            writer.close()
            await writer.wait_closed()


@pytest.mark.parametrize(
    "sent",
    [b"", header(1, 0)[:6], header(1, 100) + b"half"],
    ids=["nothing", "half_header", "half_payload"],
)
def test_stalled_peer_hits_the_read_deadline(sent: bytes) -> None:
    async def body(reader: asyncio.StreamReader) -> None:
        with pytest.raises(TransportError, match=r"within 0\.2 s"):
            await read_frame(reader, timeout=0.2)

    start = time.monotonic()
    asyncio.run(_with_stalled_peer(sent, body))
    assert 0.15 < time.monotonic() - start < 1.0


def test_deadline_covers_the_whole_frame_not_each_read() -> None:
    # A peer that trickles one byte every 50 ms never trips a per-read timeout of 0.2 s.
    async def run() -> None:
        reader = asyncio.StreamReader()

        async def trickle() -> None:
            for byte in header(1, 100) + b"x" * 100:
                reader.feed_data(bytes([byte]))
                await asyncio.sleep(0.05)

        feeder = asyncio.create_task(trickle())
        try:
            with pytest.raises(TransportError):
                await read_frame(reader, timeout=0.3)
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder

    asyncio.run(run())


@pytest.mark.parametrize(
    "sent",
    [b"", header(1, 0)[:6], header(1, 100) + b"half"],
    ids=["nothing", "half_header", "half_payload"],
)
def test_blocking_stalled_peer_hits_the_deadline(sent: bytes) -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(sent)
        start = time.monotonic()
        with pytest.raises(TransportError):
            recv_frame(right, timeout=0.2)
        assert time.monotonic() - start < 1.0
        assert right.gettimeout() is None  # the socket's own setting is restored
        right.settimeout(0.2)
        with pytest.raises(TransportError):
            recv_frame(right)  # the socket's timeout bounds each receive


def test_blocking_io_without_any_deadline_is_refused() -> None:
    left, right = socket.socketpair()
    with left, right:
        with pytest.raises(ConfigError, match="no timeout"):
            recv_frame(right)
        with pytest.raises(ConfigError, match="no timeout"):
            send_frame(left, Frame(FrameType.HEALTH_PING, 0, b""))


def test_write_to_a_peer_that_never_reads_hits_the_deadline() -> None:
    async def run() -> None:
        left, right = socket.socketpair()
        with right:
            _reader, writer = await asyncio.open_connection(sock=left)
            try:
                frame = Frame(FrameType.BUNDLE_CHUNK, 1, b"\x00" * (4 * 1024 * 1024))
                with pytest.raises(TransportError, match=r"within 0\.2 s"):
                    await write_frame(writer, frame, timeout=0.2)
            finally:
                writer.transport.abort()

    asyncio.run(run())


def test_blocking_send_to_a_peer_that_never_reads_hits_the_deadline() -> None:
    left, right = socket.socketpair()
    with left, right:
        frame = Frame(FrameType.BUNDLE_CHUNK, 1, b"\x00" * (4 * 1024 * 1024))
        with pytest.raises(TransportError):
            send_frame(left, frame, timeout=0.2)


def test_write_to_a_closed_peer_is_a_transport_error() -> None:
    async def write_until_it_fails(writer: asyncio.StreamWriter) -> None:
        for _ in range(50):  # the first writes may only fill the buffer
            await write_frame(writer, Frame(FrameType.HEALTH_PING, 0, b"x" * 65536), timeout=0.5)

    async def run() -> None:
        left, right = socket.socketpair()
        right.close()
        _reader, writer = await asyncio.open_connection(sock=left)
        try:
            with pytest.raises(TransportError):
                await write_until_it_fails(writer)
        finally:
            writer.transport.abort()

    asyncio.run(run())


# -- structured payloads -----------------------------------------------------------------------


def test_payload_round_trips() -> None:
    error = ErrorPayload("UnknownBundle", "no bundle of that name")
    assert ErrorPayload.decode(error.encode()) == error
    assert cbor2.loads(error.encode()) == {
        "code": "UnknownBundle",
        "message": "no bundle of that name",
    }
    request = BundleRequest("llava-7b-v3", from_chunk=12)
    assert BundleRequest.decode(request.encode()) == request
    assert cbor2.loads(request.encode()) == {"bundle": "llava-7b-v3", "from_chunk": 12}
    end = BundleEnd(chunk_count=2**40)
    assert BundleEnd.decode(end.encode()) == end
    chunk = BundleChunk(index=5, sealed=b"\xaa" * 20)
    assert chunk.encode() == bytes.fromhex("0000000000000005") + b"\xaa" * 20
    assert BundleChunk.decode(chunk.encode()) == chunk
    assert BundleChunk.decode(bytes(8)) == BundleChunk(0, b"")


def test_payload_frames_carry_their_type() -> None:
    assert ErrorPayload("Busy", "").frame(3).type is FrameType.ERROR
    assert BundleRequest("b").frame().type is FrameType.BUNDLE_REQUEST
    assert BundleChunk(0, b"").frame().type is FrameType.BUNDLE_CHUNK
    assert BundleEnd(1).frame(9) == Frame(FrameType.BUNDLE_END, 9, BundleEnd(1).encode())


def req(**fields: object) -> bytes:
    """A BUNDLE_REQUEST payload with some fields replaced (``None`` removes one)."""
    value = {"bundle": "b", "from_chunk": 0, **fields}
    return cbor2.dumps({k: v for k, v in value.items() if v is not None})


def err(**fields: object) -> bytes:
    return cbor2.dumps({"code": "X", "message": "", **fields})


def cbor_seq(*items: object) -> bytes:
    return b"".join(cbor2.dumps(item) for item in items)


GOOD_REQUEST = req()
REQ, ERR, END, CHUNK = (
    BundleRequest.decode,
    ErrorPayload.decode,
    BundleEnd.decode,
    BundleChunk.decode,
)

HOSTILE_PAYLOADS: list[tuple[str, Callable[[bytes], object], bytes]] = [
    ("request_trailing_bytes", REQ, GOOD_REQUEST + b"\x00"),
    ("request_truncated", REQ, GOOD_REQUEST[:-1]),
    ("request_empty", REQ, b""),
    ("request_not_cbor", REQ, b"\xff\xff"),
    ("request_not_a_map", REQ, cbor2.dumps(["b", 0])),
    ("request_missing_field", REQ, req(from_chunk=None)),
    ("request_unknown_field", REQ, req(x=1)),
    ("request_duplicate_key", REQ, b"\xa2" + cbor_seq("bundle", "b", "bundle", "c")),
    ("request_negative_chunk", REQ, req(from_chunk=-1)),
    ("request_bool_chunk", REQ, req(from_chunk=True)),
    ("request_float_chunk", REQ, req(from_chunk=1.0)),
    ("request_bignum_chunk", REQ, req(from_chunk=2**64)),
    ("request_tagged_chunk", REQ, b"\xa2" + cbor_seq("bundle", "b", "from_chunk") + b"\xc1\x01"),
    ("request_bytes_name", REQ, req(bundle=b"b")),
    ("request_empty_name", REQ, req(bundle="")),
    ("request_name_with_space", REQ, req(bundle="a b")),
    ("request_name_with_newline", REQ, req(bundle="a\nb")),
    ("request_name_too_long", REQ, req(bundle="a" * 257)),
    ("request_nested", REQ, req(bundle=["b"])),
    ("request_over_size", REQ, req(pad="x" * 5000)),
    ("error_trailing_bytes", ERR, err() + b"\xf6"),
    ("error_bad_code", ERR, err(code="no spaces")),
    ("error_empty_code", ERR, err(code="")),
    ("error_long_message", ERR, err(message="m" * 1025)),
    ("error_int_message", ERR, err(message=1)),
    ("end_trailing_bytes", END, cbor2.dumps({"chunk_count": 1}) + b"\x00"),
    ("end_negative", END, cbor2.dumps({"chunk_count": -1})),
    ("end_text", END, cbor2.dumps({"chunk_count": "1"})),
    ("end_indefinite_map_unterminated", END, b"\xbf" + cbor_seq("chunk_count", 1)),
    ("chunk_short_index", CHUNK, b"\x00" * 7),
    ("chunk_empty", CHUNK, b""),
]


@pytest.mark.parametrize(
    ("decode", "payload"), [c[1:] for c in HOSTILE_PAYLOADS], ids=[c[0] for c in HOSTILE_PAYLOADS]
)
def test_rejects_hostile_payload(decode: Callable[[bytes], object], payload: bytes) -> None:
    with pytest.raises(FrameError):
        decode(payload)


@pytest.mark.parametrize(
    "decode", [ErrorPayload.decode, BundleRequest.decode, BundleEnd.decode, BundleChunk.decode]
)
def test_decoders_refuse_non_bytes(decode: Callable[[object], object]) -> None:
    with pytest.raises(FrameError):
        decode(bytearray(b"\xa0"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_payload_decoders_raise_only_frame_error(data: bytes) -> None:
    for decode in (ErrorPayload.decode, BundleRequest.decode, BundleEnd.decode, BundleChunk.decode):
        with contextlib.suppress(FrameError):
            decode(data)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["bundle", "from_chunk", "code", "message", "chunk_count", "x"]),
        st.one_of(
            st.integers(), st.text(max_size=5), st.binary(max_size=3), st.none(), st.booleans()
        ),
        max_size=4,
    )
)
def test_payload_decoders_raise_only_frame_error_on_cbor_maps(value: dict[str, object]) -> None:
    data = cbor2.dumps(value)
    for decode in (ErrorPayload.decode, BundleRequest.decode, BundleEnd.decode):
        with contextlib.suppress(FrameError):
            decode(data)


def test_default_max_payload_holds_a_16_mib_sealed_chunk() -> None:
    payload = BundleChunk(0, b"\x00" * (16 * 1024 * 1024 + 16)).encode()
    assert DEFAULT_MAX_PAYLOAD == 16 * 1024 * 1024 + 64
    assert len(payload) <= DEFAULT_MAX_PAYLOAD
    encode_frame(Frame(FrameType.BUNDLE_CHUNK, 0, payload))
