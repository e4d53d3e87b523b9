"""The parent's control link to the enclave: multiplexing, errors, deadlines, reconnects.

The enclave here is :class:`~tests.parent.fakeenclave.FakeEnclave`, a small asyncio frame server
speaking the control protocol of docs/request-path.md and scripted per test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from parent.enclave_link import EnclaveError, EnclaveLink, LinkTimeouts
from protocol.control import Credentials, Health, InferMode, InferRequest
from protocol.errors import FrameError
from protocol.frames import ErrorPayload, Frame, FrameType, encode_frame, read_frame
from protocol.transport import Address, start_server
from tests.parent.fakeenclave import READY, FakeEnclave, InferScript, Send, echo, refuse

CREDS = Credentials("AKIAEXAMPLEEXAMPLE01", "secret/Example+Key", "token", "2030-01-01T00:00:00Z")

FAST = LinkTimeouts(connect=1, frame=1, write=1, health=1, attestation=1, first_response=2)


@contextlib.asynccontextmanager
async def linked(
    tmp_path: Path, *, infer: InferScript = echo, timeouts: LinkTimeouts = FAST, **kwargs: object
) -> AsyncIterator[tuple[FakeEnclave, EnclaveLink]]:
    address = Address("unix", path=str(tmp_path / "enclave.sock"))
    async with FakeEnclave(address, infer=infer) as enclave:
        link = EnclaveLink(address, timeouts=timeouts, backoff_max=0.1, **kwargs)  # type: ignore[arg-type]
        async with link:
            await link.wait_connected(2)
            yield enclave, link


def aborting(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A raw test server's handler that drops its connection however it ends."""

    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        finally:
            writer.transport.abort()

    return wrapped


async def collect(link: EnclaveLink, request: InferRequest) -> list[bytes]:
    async with link.infer(request) as stream:
        return [chunk async for chunk in stream]


# -- requests ----------------------------------------------------------------------------------


def test_health_and_attestation_pass_through(tmp_path: Path) -> None:
    async def run() -> tuple[Health, bytes, list[Frame]]:
        async with linked(tmp_path) as (enclave, link):
            health, document = await link.health(), await link.attest(b"n" * 32)
            await asyncio.sleep(0.05)
            return health, document, enclave.received

    health, document, received = asyncio.run(run())
    assert health == READY
    assert document == b"DOC:" + b"n" * 32
    assert cancels(received) == []  # answered streams are not cancelled


@pytest.mark.parametrize("nonce", [b"", b"x" * 15, b"x" * 65])
def test_rejects_a_nonce_outside_16_to_64_bytes_before_sending(
    tmp_path: Path, nonce: bytes
) -> None:
    async def run() -> list[Frame]:
        async with linked(tmp_path) as (enclave, link):
            with pytest.raises(FrameError):
                await link.attest(nonce)
            return enclave.received

    assert not [f for f in asyncio.run(run()) if f.type is FrameType.ATTESTATION_REQUEST]


@pytest.mark.parametrize("mode", list(InferMode))
def test_infer_streams_every_chunk_verbatim_and_in_order(tmp_path: Path, mode: InferMode) -> None:
    message = bytes(range(256)) * 3

    async def run() -> list[bytes]:
        async with linked(tmp_path) as (_, link):
            return await collect(link, InferRequest(mode, message))

    chunks = asyncio.run(run())
    assert b"".join(chunks) == message
    assert len(chunks) == (1 if mode is InferMode.SINGLE else 256)


def test_concurrent_streams_are_multiplexed_by_id(tmp_path: Path) -> None:
    async def slow_echo(request: InferRequest, stream_id: int, send: Send) -> None:
        for byte in request.message:
            await send(Frame(FrameType.INFER_RESPONSE_CHUNK, stream_id, bytes([byte])))
            await asyncio.sleep(0.001)
        await send(Frame(FrameType.INFER_RESPONSE_END, stream_id, b""))

    messages = [bytes([i]) * 20 for i in range(1, 9)]

    async def run() -> tuple[list[list[bytes]], set[int]]:
        async with linked(tmp_path, infer=slow_echo) as (enclave, link):
            results = await asyncio.gather(
                *(collect(link, InferRequest(InferMode.CHUNKED, m)) for m in messages)
            )
            ids = {f.stream_id for f in enclave.received if f.type is FrameType.INFER_REQUEST}
            return list(results), ids

    results, ids = asyncio.run(run())
    assert [b"".join(r) for r in results] == messages
    assert len(ids) == len(messages)
    assert 0 not in ids


@pytest.mark.parametrize("code", ["unknown_key", "malformed", "busy", "too_large", "internal"])
def test_enclave_error_carries_its_code(tmp_path: Path, code: str) -> None:
    async def run() -> EnclaveError:
        async with linked(tmp_path, infer=refuse(code)) as (_, link):
            with pytest.raises(EnclaveError) as info:
                await collect(link, InferRequest(InferMode.SINGLE, b"x"))
            return info.value

    error = asyncio.run(run())
    assert (error.code, error.mid_stream) == (code, False)


def test_unknown_error_code_from_the_enclave_becomes_internal(tmp_path: Path) -> None:
    async def run() -> EnclaveError:
        async with linked(tmp_path, infer=refuse("SomethingElse")) as (_, link):
            with pytest.raises(EnclaveError) as info:
                await collect(link, InferRequest(InferMode.SINGLE, b"x"))
            return info.value

    assert asyncio.run(run()).code == "internal"


def test_error_after_chunks_is_marked_mid_stream(tmp_path: Path) -> None:
    async def fail_late(request: InferRequest, stream_id: int, send: Send) -> None:
        await send(Frame(FrameType.INFER_RESPONSE_CHUNK, stream_id, b"part"))
        await send(ErrorPayload("internal", "model failed").frame(stream_id))

    async def run() -> tuple[list[bytes], EnclaveError]:
        got: list[bytes] = []
        async with linked(tmp_path, infer=fail_late) as (_, link):
            stream = link.infer(InferRequest(InferMode.CHUNKED, b"x"))
            got.append(await anext(stream))
            with pytest.raises(EnclaveError) as info:
                await anext(stream)
            return got, info.value

    got, error = asyncio.run(run())
    assert got == [b"part"]
    assert (error.code, error.mid_stream) == ("internal", True)


@pytest.mark.parametrize("chunks_before", [0, 2])
def test_connection_loss_fails_the_stream_and_says_whether_it_had_started(
    tmp_path: Path, chunks_before: int
) -> None:
    enclave_box: list[FakeEnclave] = []

    async def die(request: InferRequest, stream_id: int, send: Send) -> None:
        for _ in range(chunks_before):
            await send(Frame(FrameType.INFER_RESPONSE_CHUNK, stream_id, b"c"))
        await asyncio.sleep(0.05)
        enclave_box[0].kill_connections()

    async def run() -> tuple[int, EnclaveError]:
        got = 0
        async with linked(tmp_path, infer=die) as (enclave, link):
            enclave_box.append(enclave)
            stream = link.infer(InferRequest(InferMode.CHUNKED, b"x"))
            for _ in range(chunks_before):
                await anext(stream)
                got += 1
            with pytest.raises(EnclaveError) as info:
                await anext(stream)
            return got, info.value

    got, error = asyncio.run(run())
    assert got == chunks_before
    assert (error.code, error.mid_stream) == ("unreachable", chunks_before > 0)


def cancels(received: list[Frame]) -> list[tuple[int, str]]:
    """The parent's cancels among the frames the enclave received: (stream id, code)."""
    return [
        (f.stream_id, ErrorPayload.decode(f.payload).code)
        for f in received
        if f.type is FrameType.ERROR
    ]


async def settle(enclave: FakeEnclave, count: int) -> list[tuple[int, str]]:
    """Wait (up to 2 s) until the enclave has received ``count`` cancels."""
    for _ in range(200):
        if len(cancels(enclave.received)) >= count:
            break
        await asyncio.sleep(0.01)
    return cancels(enclave.received)


@pytest.mark.parametrize(
    "request_type",
    [FrameType.ATTESTATION_REQUEST, FrameType.INFER_REQUEST],
    ids=["attestation", "inference"],
)
def test_attestation_flood_cannot_pin_enclave_streams_given_up_at_their_deadline(
    tmp_path: Path, request_type: FrameType
) -> None:
    """A request the link gives up on (its deadline passed) is cancelled in the enclave, so a
    flood of slow requests cannot keep the enclave's streams (and its NSM or model) busy."""

    async def silent(request: InferRequest, stream_id: int, send: Send) -> None:
        await asyncio.sleep(30)

    timeouts = LinkTimeouts(connect=1, attestation=0.1, first_response=0.1)

    async def run() -> tuple[EnclaveError, list[tuple[int, str]], int, int]:
        async with linked(tmp_path, infer=silent, timeouts=timeouts) as (enclave, link):
            enclave.attest_delay = 30
            request: Awaitable[object]
            if request_type is FrameType.ATTESTATION_REQUEST:
                request = link.attest(b"n" * 32)
            else:
                request = collect(link, InferRequest(InferMode.SINGLE, b"x"))
            with pytest.raises(EnclaveError) as info:
                await request
            sent = next(f.stream_id for f in enclave.received if f.type is request_type)
            return info.value, await settle(enclave, 1), sent, link.open_streams

    error, cancelled, stream_id, still_open = asyncio.run(run())
    assert error.code == "timeout"
    assert cancelled == [(stream_id, "cancelled")]
    assert still_open == 0


def test_attestation_whose_caller_left_is_cancelled_in_the_enclave(tmp_path: Path) -> None:
    async def run() -> tuple[list[tuple[int, str]], int]:
        async with linked(tmp_path) as (enclave, link):
            enclave.attest_delay = 30
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):  # the consumer gave up first
                    await link.attest(b"n" * 32)
            return await settle(enclave, 1), link.open_streams

    cancelled, still_open = asyncio.run(run())
    assert [code for _, code in cancelled] == ["cancelled"]
    assert still_open == 0


def test_silent_enclave_hits_the_response_deadline(tmp_path: Path) -> None:
    async def silent(request: InferRequest, stream_id: int, send: Send) -> None:
        await asyncio.sleep(30)

    timeouts = LinkTimeouts(connect=1, first_response=0.2)

    async def run() -> tuple[EnclaveError, float, int]:
        async with linked(tmp_path, infer=silent, timeouts=timeouts) as (_, link):
            started = time.monotonic()
            with pytest.raises(EnclaveError) as info:
                await collect(link, InferRequest(InferMode.SINGLE, b"x"))
            return info.value, time.monotonic() - started, link.open_streams

    error, elapsed, still_open = asyncio.run(run())
    assert error.code == "timeout"
    assert 0.15 < elapsed < 1.5
    assert still_open == 0


# -- the connection ----------------------------------------------------------------------------


def test_requests_fail_at_once_while_the_enclave_is_unreachable(tmp_path: Path) -> None:
    address = Address("unix", path=str(tmp_path / "nobody.sock"))

    async def run() -> tuple[EnclaveError, float]:
        async with EnclaveLink(address, timeouts=FAST) as link:
            started = time.monotonic()
            with pytest.raises(EnclaveError) as info:
                await link.health()
            return info.value, time.monotonic() - started

    error, elapsed = asyncio.run(run())
    assert error.code == "unreachable"
    assert elapsed < 0.1


def test_link_reconnects_after_an_enclave_restart_and_resends_credentials(tmp_path: Path) -> None:
    address = Address("unix", path=str(tmp_path / "enclave.sock"))

    async def run() -> tuple[int, int, list[Credentials]]:
        link = EnclaveLink(address, timeouts=FAST, backoff_max=0.1)

        async def forward() -> None:
            await link.send_credentials(CREDS)

        link.on_connect(forward)
        async with link:
            first = FakeEnclave(address)
            await first.start()
            await link.wait_connected(2)
            assert (await link.health()).ready
            await first.stop()  # the enclave dies ...
            await asyncio.sleep(0.2)
            assert not link.connected
            second = FakeEnclave(address)  # ... and the launcher starts a new one
            await second.start()
            try:
                await link.wait_connected(2)
                assert (await link.health()).ready
                await asyncio.sleep(0.05)
                return first.connections, second.connections, first.credentials + second.credentials
            finally:
                await second.stop()

    first, second, credentials = asyncio.run(run())
    assert (first, second) == (1, 1)
    assert credentials == [CREDS, CREDS]


def test_peer_that_accepts_and_hangs_up_at_once_does_not_spin_the_link(tmp_path: Path) -> None:
    # a relay in front of a stopped enclave accepts and closes every connection at once; the
    # link must back off (it made thousands of connections a second before)
    address = Address("unix", path=str(tmp_path / "relay.sock"))
    accepted = 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    async def run() -> int:
        server = await start_server(address, hang_up)
        try:
            async with EnclaveLink(address, timeouts=FAST, backoff_max=0.4):
                await asyncio.sleep(1.0)
        finally:
            server.close()
        return accepted

    # backoff 0.05, 0.1, 0.2, 0.4, 0.4 ... s: about six connections in one second
    assert 2 <= asyncio.run(run()) <= 10


def test_bad_frame_header_from_the_enclave_drops_the_connection(tmp_path: Path) -> None:
    address = Address("unix", path=str(tmp_path / "enclave.sock"))

    @aborting
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"XX" + b"\x00" * 20)  # bad magic
        await asyncio.sleep(5)

    async def run() -> EnclaveError:
        server = await start_server(address, garbage)
        try:
            async with EnclaveLink(address, timeouts=FAST, backoff_max=0.1) as link:
                await link.wait_connected(2)
                with pytest.raises(EnclaveError) as info:
                    await link.health()
                return info.value
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(run()).code == "unreachable"


def test_trickled_frame_is_dropped_at_the_frame_deadline(tmp_path: Path) -> None:
    address = Address("unix", path=str(tmp_path / "enclave.sock"))

    @aborting
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_frame(reader, timeout=2)
        data = encode_frame(READY.frame(request.stream_id))
        for byte in data[:-1]:  # never the last byte
            writer.write(bytes([byte]))
            await asyncio.sleep(0.01)
        await asyncio.sleep(5)

    timeouts = LinkTimeouts(connect=1, frame=0.3, health=5)

    async def run() -> tuple[EnclaveError, float]:
        server = await start_server(address, trickle)
        try:
            async with EnclaveLink(address, timeouts=timeouts, backoff_max=0.1) as link:
                await link.wait_connected(2)
                started = time.monotonic()
                with pytest.raises(EnclaveError) as info:
                    await link.health()
                return info.value, time.monotonic() - started
        finally:
            server.close()
            await server.wait_closed()

    error, elapsed = asyncio.run(run())
    assert error.code == "unreachable"
    assert elapsed < 2


def test_frames_of_an_abandoned_stream_are_dropped_not_misdelivered(tmp_path: Path) -> None:
    async def late(request: InferRequest, stream_id: int, send: Send) -> None:
        if request.message == b"first":
            await asyncio.sleep(0.2)  # answers after its caller gave up
        await send(Frame(FrameType.INFER_RESPONSE_CHUNK, stream_id, request.message))
        await send(Frame(FrameType.INFER_RESPONSE_END, stream_id, b""))

    async def run() -> tuple[list[bytes], int, list[Frame]]:
        async with linked(tmp_path, infer=late) as (enclave, link):
            stream = link.infer(InferRequest(InferMode.SINGLE, b"first"))
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await anext(stream)
            await stream.aclose()
            second = await collect(link, InferRequest(InferMode.SINGLE, b"second"))
            await asyncio.sleep(0.3)
            return second, link.dropped_frames, enclave.received

    second, dropped, received = asyncio.run(run())
    assert second == [b"second"]
    assert dropped == 2  # the first stream's CHUNK and END
    # the enclave was told to stop working on the abandoned stream, and only on that one
    first_id = next(f.stream_id for f in received if f.payload == b"\x00first")
    cancels = [f for f in received if f.type is FrameType.ERROR]
    assert [(f.stream_id, ErrorPayload.decode(f.payload).code) for f in cancels] == [
        (first_id, "cancelled")
    ]


def test_slow_reader_loses_its_own_stream_and_nobody_else_waits(tmp_path: Path) -> None:
    piece = b"z" * 65536

    async def flood_or_echo(request: InferRequest, stream_id: int, send: Send) -> None:
        if request.message != b"flood":
            await echo(request, stream_id, send)
            return
        for _ in range(64):  # 4 MiB, far more than the reader's buffer
            await send(Frame(FrameType.INFER_RESPONSE_CHUNK, stream_id, piece))
        await send(Frame(FrameType.INFER_RESPONSE_END, stream_id, b""))

    async def run() -> tuple[EnclaveError, list[bytes], int, list[Frame]]:
        async with linked(tmp_path, infer=flood_or_echo, stream_buffer=256 * 1024) as (
            enclave,
            link,
        ):
            slow = link.infer(InferRequest(InferMode.CHUNKED, b"flood"))
            await anext(slow)  # then it stops reading
            await asyncio.sleep(0.2)
            other = await collect(link, InferRequest(InferMode.SINGLE, b"meanwhile"))
            with pytest.raises(EnclaveError) as info:
                await anext(slow)  # its backlog was dropped, not kept
            cancels = [f for f in enclave.received if f.type is FrameType.ERROR]
            return info.value, other, link.overflows, cancels

    error, other, overflows, cancels = asyncio.run(run())
    assert (error.code, error.mid_stream) == ("overflow", True)
    assert other == [b"meanwhile"]
    assert overflows == 1
    assert len(cancels) == 1
