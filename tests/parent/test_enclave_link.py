"""The parent's control link to the enclave: multiplexing, errors, deadlines, reconnects.

The enclave here is :class:`FakeEnclave`, a small asyncio frame server speaking the control
protocol of docs/request-path.md and scripted per test (the bridge tests use it too).
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
from protocol.errors import FrameError, ProtocolError
from protocol.frames import (
    ErrorPayload,
    Frame,
    FrameType,
    encode_frame,
    read_frame,
    write_frame,
)
from protocol.transport import Address, start_server

READY = Health("ready", 6, 6, "ready", key_id=7)
BOOTING = Health("booting", 2, 6, "credentials")
CREDS = Credentials("AKIAEXAMPLEEXAMPLE01", "secret/Example+Key", "token", "2030-01-01T00:00:00Z")

Send = Callable[[Frame], Awaitable[None]]
InferScript = Callable[[InferRequest, int, Send], Awaitable[None]]


async def echo(request: InferRequest, stream_id: int, send: Send) -> None:
    """Mode 0: the request back as one chunk. Mode 1: the request back in 3-byte chunks."""
    if request.mode is InferMode.SINGLE:
        await send(Frame(FrameType.INFER_RESPONSE_CHUNK, stream_id, request.message))
    else:
        for i in range(0, len(request.message), 3):
            piece = request.message[i : i + 3]
            await send(Frame(FrameType.INFER_RESPONSE_CHUNK, stream_id, piece))
    await send(Frame(FrameType.INFER_RESPONSE_END, stream_id, b""))


def refuse(code: str, message: str = "refused") -> InferScript:
    async def script(request: InferRequest, stream_id: int, send: Send) -> None:
        await send(ErrorPayload(code, message).frame(stream_id))

    return script


class FakeEnclave:
    """The enclave's side of the control connection, in-process, for tests.

    Answers HEALTH_PING with :attr:`health`, ATTESTATION_REQUEST with ``b"DOC:" + nonce`` (or
    an ERROR ``not_ready`` when not ready) and INFER_REQUEST with :attr:`infer` (each request in
    its own task, so streams interleave). Records credentials and frames received.
    """

    def __init__(self, address: Address, *, infer: InferScript = echo) -> None:
        self.address = address
        self.health = READY
        self.infer = infer
        self.credentials: list[Credentials] = []
        self.received: list[Frame] = []
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._serving: set[asyncio.Task[None]] = set()

    async def start(self) -> FakeEnclave:
        self._server = await start_server(self.address, self._serve)
        return self

    async def stop(self) -> None:
        """Stop listening and drop every connection abruptly (a crash)."""
        if self._server is not None:
            self._server.close()
        self.kill_connections()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._serving:  # each ends on its aborted connection
            await asyncio.wait(self._serving, timeout=2)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def kill_connections(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def __aenter__(self) -> FakeEnclave:
        return await self.start()

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)
        lock = asyncio.Lock()

        async def send(frame: Frame) -> None:
            async with lock:
                await write_frame(writer, frame, timeout=5)

        try:
            while True:
                frame = await read_frame(reader, timeout=60)
                self.received.append(frame)
                task = asyncio.create_task(self._answer(frame, send))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (ProtocolError, OSError):  # ConnectionClosed, a bad frame, a reset
            pass
        finally:
            writer.transport.abort()

    async def _answer(self, frame: Frame, send: Send) -> None:
        with contextlib.suppress(Exception):
            if frame.type is FrameType.HEALTH_PING:
                await send(self.health.frame(frame.stream_id))
            elif frame.type is FrameType.CREDENTIALS:
                self.credentials.append(Credentials.decode(frame.payload))
            elif frame.type is FrameType.ATTESTATION_REQUEST:
                if not self.health.ready:
                    await send(ErrorPayload("not_ready", "boot step 2").frame(frame.stream_id))
                else:
                    document = b"DOC:" + frame.payload
                    await send(Frame(FrameType.ATTESTATION_RESPONSE, frame.stream_id, document))
            elif frame.type is FrameType.INFER_REQUEST:
                if not self.health.ready:
                    await send(ErrorPayload("not_ready", "boot step 2").frame(frame.stream_id))
                else:
                    await self.infer(InferRequest.decode(frame.payload), frame.stream_id, send)


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
    async def run() -> tuple[Health, bytes]:
        async with linked(tmp_path) as (_, link):
            return await link.health(), await link.attest(b"n" * 32)

    health, document = asyncio.run(run())
    assert health == READY
    assert document == b"DOC:" + b"n" * 32


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
