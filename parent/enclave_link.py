"""The parent's side of the control connection to the enclave (docs/request-path.md).

One connection from the parent to the enclave's control address carries health, credentials,
attestation and inference, multiplexed by ``stream_id``::

    EnclaveLink ──connect (deadline)──▶ enclave control address
      │  reconnects with capped exponential backoff when the connection drops (enclave restart),
      │  runs the on-connect hooks (the credentials forwarder) on every new connection
      ├─ health()          HEALTH_PING          → HEALTH_PONG               (Health)
      ├─ attest(nonce)     ATTESTATION_REQUEST  → ATTESTATION_RESPONSE      (document bytes)
      ├─ infer(request)    INFER_REQUEST        → INFER_RESPONSE_CHUNK… END (async iterator)
      ├─ send_credentials  CREDENTIALS (stream 0, no answer)
      └─ (abandoned)       ERROR {"code": "cancelled"} on any stream the parent gives up on
                           before the enclave ended it (a deadline passed, the caller was
                           cancelled, its reader fell behind): the enclave stops working on it
                           and frees its stream (enclave/server.py)

Stream ids are assigned here, non-zero, increasing (wrapping only after 2³²−1 requests), so a late
frame of an abandoned stream can never be mistaken for a later request's; frames of streams
nobody waits for any more are dropped. Any stream may end with ERROR, which is raised as
:class:`EnclaveError` carrying the enclave's code; so is the loss of the connection, and
``mid_stream`` tells whether response bytes had been handed out already (the bridge must then
abort its HTTP response instead of sending an error status).

Everything read from the connection comes from the enclave side of the vsock. The enclave is the
trusted party, but the bytes still cross a transport the parent's operator controls locally, so
frames are checked exactly as anywhere else (header before payload, size caps, strict decoders).

The hot path uses the asyncio Protocol API (no StreamReader copies, no per-frame task): frames are
parsed in ``data_received`` and handed to per-stream queues (both in :mod:`parent._linkprotocol`).
Deadlines: a frame that has started must complete within ``frame`` seconds; every wait of a caller
for its next frame has its own deadline; writes wait for the transport's buffer to drain within
``write`` seconds. Memory: a stream whose reader falls more than ``stream_buffer`` bytes behind (a
consumer that stopped reading) is cancelled with ``EnclaveError("overflow")``; the connection
itself is never paused, so one slow consumer cannot stall the others (nor trip the enclave's write
deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from parent._linkprotocol import FrameConnection, Received, StreamQueue
from protocol.control import ERROR_CODES, Credentials, Health, InferRequest, check_nonce
from protocol.errors import ConfigError, FrameError, TransportError
from protocol.frames import DEFAULT_MAX_PAYLOAD, ErrorPayload, Frame, FrameType, encode_frame
from protocol.transport import Address, check_timeout

__all__ = ["EnclaveError", "EnclaveLink", "InferStream", "LinkTimeouts"]

logger = logging.getLogger(__name__)

_U32_MAX: Final = 0xFFFF_FFFF
LINK_CODES: Final = frozenset({"unreachable", "timeout", "overflow"})
CANCEL_CODE: Final = "cancelled"  # ERROR code the parent sends to cancel a stream
"""Codes the link itself raises, beside the enclave's :data:`~protocol.control.ERROR_CODES`."""


class EnclaveError(Exception):
    """A request on the control connection failed.

    ``code`` is the enclave's error code (one of :data:`protocol.control.ERROR_CODES`; an unknown
    code from the enclave becomes ``internal``), or ``unreachable`` (no connection, or it dropped)
    or ``timeout`` (a deadline passed). ``mid_stream`` is true when response bytes of this stream
    had already been handed to the caller: the response cannot be replaced by an error any more.
    The message names what failed, never content.
    """

    def __init__(self, code: str, message: str, *, mid_stream: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.mid_stream = mid_stream


@dataclass(frozen=True)
class LinkTimeouts:
    """Deadlines of the control connection, in seconds."""

    connect: float = 5.0  # to open the connection
    frame: float = 30.0  # for a frame that has started arriving to complete
    write: float = 30.0  # for the enclave to take a frame (drain)
    health: float = 2.0  # HEALTH_PING → HEALTH_PONG
    attestation: float = 10.0  # ATTESTATION_REQUEST → ATTESTATION_RESPONSE
    first_response: float = 120.0  # INFER_REQUEST → its first frame (the model is working)
    between_chunks: float = 60.0  # INFER_RESPONSE_CHUNK → the next frame

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            try:
                check_timeout(getattr(self, name))
            except ConfigError:
                raise ConfigError(f"timeouts.{name} must be a positive number of seconds") from None


class InferStream:
    """The response of one inference request: ``async for chunk in stream`` yields the bytes of
    each INFER_RESPONSE_CHUNK, in order, and ends on INFER_RESPONSE_END.

    Raises :class:`EnclaveError` on ERROR, connection loss or a deadline, with ``mid_stream`` set
    once a chunk has been yielded. Use ``async with`` (or :meth:`aclose`) so the stream id is
    released even when the caller stops early.
    """

    def __init__(self, link: EnclaveLink, request: InferRequest) -> None:
        self._link = link
        self._request = request
        self._stream: StreamQueue | None = None
        self._done = False
        self.started = False
        """True once a chunk has been handed to the caller."""

    def __aiter__(self) -> InferStream:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        try:
            if self._stream is None:
                self._stream = self._link._open()
                await self._link._send(self._request.frame(self._stream.id))
                timeout = self._link.timeouts.first_response
            else:
                timeout = self._link.timeouts.between_chunks
            frame = await _next(self._stream, timeout, "an inference request")
        except EnclaveError as exc:
            self._finish(ended=False)  # a deadline or a lost connection: the link gives up
            exc.mid_stream = self.started
            raise
        kind, payload = frame
        if kind is FrameType.INFER_RESPONSE_CHUNK:
            self.started = True
            return payload
        # END and ERROR end the stream in the enclave too; any other type is a confused stream
        self._finish(ended=kind in (FrameType.INFER_RESPONSE_END, FrameType.ERROR))
        if kind is FrameType.INFER_RESPONSE_END:
            raise StopAsyncIteration
        raise _stream_error(frame, "INFER_RESPONSE_CHUNK", mid_stream=self.started)

    def _finish(self, *, ended: bool) -> None:
        self._done = True
        if self._stream is not None:
            self._link._release(self._stream, ended=ended)

    async def aclose(self) -> None:
        """Release the stream; if its response had not ended, tell the enclave to stop working
        on it (an ERROR frame from the parent cancels a stream)."""
        if not self._done:
            self._finish(ended=False)

    async def __aenter__(self) -> InferStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


async def _next(stream: StreamQueue, timeout: float, what: str) -> Received:
    """The stream's next frame; ``EnclaveError("timeout")`` when none comes within ``timeout``."""
    try:
        return await stream.get(timeout)
    except TimeoutError:
        raise EnclaveError("timeout", f"the enclave did not answer {what} in {timeout} s") from None


def _stream_error(frame: Received, expected: str, *, mid_stream: bool = False) -> EnclaveError:
    """The error to raise for ``frame`` where ``expected`` was due (ERROR or a wrong type)."""
    kind, payload = frame
    if kind is FrameType.ERROR:
        try:
            error = ErrorPayload.decode(payload)
        except FrameError:
            return EnclaveError(
                "internal", "the enclave sent a malformed ERROR", mid_stream=mid_stream
            )
        code = error.code if error.code in ERROR_CODES else "internal"
        return EnclaveError(code, error.message, mid_stream=mid_stream)
    return EnclaveError(
        "internal",
        f"the enclave sent {kind.name}, expected {expected}",
        mid_stream=mid_stream,
    )


# -- the link ----------------------------------------------------------------------------------


STABLE_CONNECTION: Final = 5.0
"""Seconds a connection must last before a drop reconnects at the initial backoff again."""


class EnclaveLink:
    """The control connection to the enclave at ``address``, kept open: it reconnects with capped
    exponential backoff whenever the connection drops.

    Use ``async with EnclaveLink(address) as link:`` (or :meth:`start` / :meth:`close`). Requests
    made while there is no connection fail at once with ``EnclaveError("unreachable")``; they are
    not queued. ``on_connect`` hooks run on every new connection before requests can use it.
    """

    def __init__(
        self,
        address: Address,
        *,
        timeouts: LinkTimeouts | None = None,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
        health_interval: float | None = 5.0,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        stream_buffer: int = 4 * 1024 * 1024,
    ) -> None:
        check_timeout(backoff_initial)
        check_timeout(backoff_max)
        if health_interval is not None:
            check_timeout(health_interval)
        if type(stream_buffer) is not int or stream_buffer < 1:
            raise ConfigError("stream_buffer must be a positive number of bytes")
        self.address = address
        self.timeouts = timeouts if timeouts is not None else LinkTimeouts()
        self.max_payload = max_payload
        self._backoff = (backoff_initial, max(backoff_initial, backoff_max))
        self._health_interval = health_interval
        self._stream_buffer = stream_buffer
        self._streams: dict[int, StreamQueue] = {}
        self._next_id = 1
        self._connection: FrameConnection | None = None
        self._connected = asyncio.Event()
        self._hooks: list[Callable[[], Awaitable[None]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._write_lock = asyncio.Lock()
        self.last_health: Health | None = None
        """The latest HEALTH_PONG (from :meth:`health` or the background poll), or None."""
        self.connections = 0
        """Connections made so far (1 + reconnects)."""
        self.dropped_frames = 0
        """Frames that arrived for no open stream (abandoned requests) and were discarded."""
        self.overflows = 0
        """Streams cancelled because their reader fell more than ``stream_buffer`` behind."""

    # lifecycle -----------------------------------------------------------------------------------

    def on_connect(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run ``await hook()`` after every (re)connect, within the connect deadline; a failing
        hook is logged, not fatal."""
        self._hooks.append(hook)

    async def start(self) -> None:
        if self._tasks:
            raise ConfigError("the enclave link is already started")
        self._tasks.append(asyncio.create_task(self._supervise(), name="enclave-link"))
        if self._health_interval is not None:
            self._tasks.append(asyncio.create_task(self._poll_health(), name="enclave-health"))

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        connection, self._connection = self._connection, None
        self._connected.clear()
        if connection is not None:
            connection.abort()
        self._fail_all("the enclave link is closed")

    async def __aenter__(self) -> EnclaveLink:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._connection is not None and self._connected.is_set()

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    async def wait_connected(self, timeout: float) -> None:
        """Wait until the link is connected; raises ``EnclaveError("unreachable")`` after
        ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError:
            raise EnclaveError(
                "unreachable", f"no connection to the enclave at {self.address} in {timeout} s"
            ) from None

    async def _supervise(self) -> None:
        initial, cap = self._backoff
        delay = initial
        while True:
            try:
                connection = await self._connect()
            except TransportError as exc:
                logger.debug("enclave link: %s; retrying in %.2f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, cap)
                continue
            started = asyncio.get_running_loop().time()
            self.connections += 1
            self._connection = connection
            logger.info(
                "enclave link: connected to %s (connection %d)", self.address, self.connections
            )
            for hook in self._hooks:
                try:
                    async with asyncio.timeout(self.timeouts.connect):
                        await hook()
                except Exception as exc:  # noqa: BLE001 - a hook must not stop the link
                    logger.warning("enclave link: on-connect hook failed (%s)", type(exc).__name__)
            if not connection.closed.done():
                self._connected.set()
            try:
                await connection.closed
            finally:
                self._connected.clear()
                self._connection = None
                self._fail_all("the connection to the enclave dropped")
            # a peer that accepts and hangs up at once (a relay in front of a stopped enclave)
            # must not put the link in a tight loop: only a connection that lasted resets backoff
            lived = asyncio.get_running_loop().time() - started
            delay = initial if lived >= STABLE_CONNECTION else min(delay * 2, cap)
            logger.warning(
                "enclave link: connection to %s lost; reconnecting in %.2f s", self.address, delay
            )
            await asyncio.sleep(delay)

    async def _connect(self) -> FrameConnection:
        loop = asyncio.get_running_loop()
        address = self.address
        timeout = self.timeouts.connect

        def factory() -> FrameConnection:
            return FrameConnection(
                self._dispatch, max_payload=self.max_payload, frame_timeout=self.timeouts.frame
            )

        try:
            async with asyncio.timeout(timeout):
                if address.kind == "unix" and address.path is not None:
                    _, connection = await loop.create_unix_connection(factory, address.path)
                elif address.kind == "tcp" and address.host is not None and address.port:
                    _, connection = await loop.create_connection(
                        factory, address.host, address.port
                    )
                else:
                    connection = await self._connect_vsock(loop, factory)
        except TimeoutError:
            raise TransportError(f"connect to {address}: no answer within {timeout} s") from None
        except OSError as exc:
            raise TransportError(
                f"connect to {address}: {exc.strerror or type(exc).__name__}"
            ) from None
        return connection

    async def _connect_vsock(
        self, loop: asyncio.AbstractEventLoop, factory: Callable[[], FrameConnection]
    ) -> FrameConnection:
        family = getattr(socket, "AF_VSOCK", None)
        if family is None:
            raise ConfigError("AF_VSOCK is not available on this platform (Linux only)")
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, (self.address.cid, self.address.port))
            _, connection = await loop.create_connection(factory, sock=sock)
        except BaseException:
            sock.close()
            raise
        return connection

    async def _poll_health(self) -> None:
        assert self._health_interval is not None
        while True:
            await self._connected.wait()
            with contextlib.suppress(EnclaveError):
                await self.health()
            await asyncio.sleep(self._health_interval)

    # streams -------------------------------------------------------------------------------------

    def _open(self) -> StreamQueue:
        if not self.connected:
            raise EnclaveError("unreachable", "no connection to the enclave")
        stream_id = self._next_id
        while stream_id in self._streams:
            stream_id = stream_id % _U32_MAX + 1
        self._next_id = stream_id % _U32_MAX + 1
        stream = StreamQueue(stream_id)
        self._streams[stream_id] = stream
        return stream

    def _release(self, stream: StreamQueue, *, ended: bool) -> None:
        """Forget ``stream``. Unless the enclave ``ended`` it (its answer, END or ERROR came) or
        the connection it was on is gone, tell the enclave to stop working on it: a request the
        parent gave up on (a deadline, its consumer left) must not keep holding the enclave's
        stream budget or its model."""
        if self._streams.get(stream.id) is stream:
            del self._streams[stream.id]
        stream.clear()
        if not ended and stream.error is None:  # error: connection lost, or already cancelled
            self._cancel(stream.id)

    def _dispatch(self, stream_id: int, frame: Received) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            self.dropped_frames += 1
            return
        stream.put(frame)
        if stream.buffered > self._stream_buffer:
            # its reader (a consumer) is not keeping up: it loses its own stream, and the
            # connection keeps flowing for everyone else (no head-of-line blocking)
            logger.warning(
                "enclave link: stream %d overflowed its buffer; cancelling it", stream_id
            )
            self.overflows += 1
            del self._streams[stream_id]
            stream.fail(
                EnclaveError("overflow", "the response was not read fast enough"), drop=True
            )
            self._cancel(stream_id)

    def _cancel(self, stream_id: int) -> None:
        """ERROR on ``stream_id``: the caller gave up (its consumer left, a deadline passed).

        Written without waiting for the transport to drain (it is tiny and cannot interleave
        with another frame: each frame is one ``write``), so it works from a cancelled task."""
        connection = self._connection
        if connection is not None:
            frame = ErrorPayload(CANCEL_CODE, "the request was abandoned").frame(stream_id)
            connection.write_now(encode_frame(frame))

    def _fail_all(self, message: str) -> None:
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            stream.fail(EnclaveError("unreachable", message))

    async def _send(self, frame: Frame) -> None:
        connection = self._connection  # set during the on-connect hooks already
        if connection is None:
            raise EnclaveError("unreachable", "no connection to the enclave")
        data = encode_frame(frame, max_payload=self.max_payload)
        try:
            async with self._write_lock:
                await connection.send(data, self.timeouts.write)
        except TimeoutError:
            raise EnclaveError(
                "timeout", f"the enclave did not take a {frame.type.name} frame in time"
            ) from None
        except OSError:
            raise EnclaveError("unreachable", "the connection to the enclave dropped") from None

    async def _exchange(self, frame_type: FrameType, payload: bytes, timeout: float) -> Received:
        """Send one request frame on a new stream and return its one answer frame. A stream
        given up on (its deadline passed, or the caller was cancelled) is cancelled in the
        enclave, as an abandoned inference stream is."""
        stream = self._open()
        answered = False
        try:
            await self._send(Frame(frame_type, stream.id, payload))
            frame = await _next(stream, timeout, frame_type.name)
            answered = True
            return frame
        finally:
            self._release(stream, ended=answered)

    # requests ------------------------------------------------------------------------------------

    async def health(self) -> Health:
        """HEALTH_PING → the enclave's boot state and counters."""
        frame = await self._exchange(FrameType.HEALTH_PING, b"", self.timeouts.health)
        if frame[0] is not FrameType.HEALTH_PONG:
            raise _stream_error(frame, "HEALTH_PONG")
        try:
            health = Health.decode(frame[1])
        except FrameError as exc:
            raise EnclaveError(
                "internal", f"the enclave sent a malformed HEALTH_PONG ({exc})"
            ) from None
        self.last_health = health
        return health

    async def attest(self, nonce: bytes) -> bytes:
        """ATTESTATION_REQUEST(nonce) → the attestation document, raw (public data).

        ``nonce`` must be 16..64 bytes (:class:`~protocol.errors.FrameError` otherwise)."""
        frame = await self._exchange(
            FrameType.ATTESTATION_REQUEST, check_nonce(nonce), self.timeouts.attestation
        )
        if frame[0] is not FrameType.ATTESTATION_RESPONSE:
            raise _stream_error(frame, "ATTESTATION_RESPONSE")
        return frame[1]

    def infer(self, request: InferRequest) -> InferStream:
        """Send ``request`` (on the first iteration) and stream its response chunks."""
        return InferStream(self, request)

    async def send_credentials(self, credentials: Credentials) -> None:
        """CREDENTIALS on stream 0; the enclave does not answer."""
        await self._send(credentials.frame())
