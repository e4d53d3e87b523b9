"""A fake enclave for the parent's tests: the enclave's side of the control connection.

:class:`FakeEnclave` is a small asyncio frame server speaking the control protocol of
docs/request-path.md, scripted per test (``infer``, ``health``, ``attest_delay``). The link, bridge,
credentials and configuration tests run against it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from protocol.control import Credentials, Health, InferMode, InferRequest
from protocol.errors import ProtocolError
from protocol.frames import ErrorPayload, Frame, FrameType, read_frame, write_frame
from protocol.transport import Address, start_server

READY = Health("ready", 6, 6, "ready", key_id=7)
BOOTING = Health("booting", 2, 6, "credentials")

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

    Answers HEALTH_PING with :attr:`health`, ATTESTATION_REQUEST with ``b"DOC:" + nonce`` after
    :attr:`attest_delay` seconds (or an ERROR ``not_ready`` when not ready) and INFER_REQUEST with
    :attr:`infer` (each request in its own task, so streams interleave). Records credentials and
    frames received, and the most attestations it was working on at once
    (:attr:`peak_attestations`). It ignores the parent's cancels (they are only recorded), so
    tests can see what the link does with late frames.
    """

    def __init__(self, address: Address, *, infer: InferScript = echo) -> None:
        self.address = address
        self.health = READY
        self.infer = infer
        self.credentials: list[Credentials] = []
        self.received: list[Frame] = []
        self.connections = 0
        self.attest_delay = 0.0
        self.attesting = 0
        self.peak_attestations = 0
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
                    await self._attest(frame, send)
            elif frame.type is FrameType.INFER_REQUEST:
                if not self.health.ready:
                    await send(ErrorPayload("not_ready", "boot step 2").frame(frame.stream_id))
                else:
                    await self.infer(InferRequest.decode(frame.payload), frame.stream_id, send)

    async def _attest(self, frame: Frame, send: Send) -> None:
        self.attesting += 1
        self.peak_attestations = max(self.peak_attestations, self.attesting)
        try:
            await asyncio.sleep(self.attest_delay)
        finally:
            self.attesting -= 1
        document = b"DOC:" + frame.payload
        await send(Frame(FrameType.ATTESTATION_RESPONSE, frame.stream_id, document))
