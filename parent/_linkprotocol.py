"""Plumbing of the control link (:mod:`parent.enclave_link`): frames in and out of the byte stream.

:class:`FrameConnection` is the asyncio Protocol of one control connection: it cuts frames out of
``data_received`` (no StreamReader copies, no task per frame), checks each header before its
payload, drops the connection when a frame that has started does not complete within the frame
deadline, and lets writers wait for the transport to drain. Each frame goes to the ``dispatch``
callback; the link hands it to the :class:`StreamQueue` of its stream id.

Everything here comes from the enclave side of the connection: the headers are checked exactly as
anywhere else (magic, type, size cap) by :func:`protocol.frames.decode_header`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import cast

from protocol.errors import FrameError
from protocol.frames import HEADER_SIZE, FrameType, decode_header

__all__ = ["FrameConnection", "Received", "StreamQueue"]

logger = logging.getLogger("parent.enclave_link")

Received = tuple[FrameType, bytes]
"""A frame as queued for its stream: type and payload."""


class StreamQueue:
    """Frames of one stream id, waiting for their reader."""

    __slots__ = ("buffered", "error", "frames", "id", "waiter")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.frames: collections.deque[Received] = collections.deque()
        self.buffered = 0  # payload bytes queued, not yet taken by the reader
        self.waiter: asyncio.Future[None] | None = None
        self.error: Exception | None = None

    def put(self, frame: Received) -> None:
        self.frames.append(frame)
        self.buffered += len(frame[1])
        self._wake()

    def fail(self, error: Exception, *, drop: bool = False) -> None:
        """End the stream with ``error``: after the queued frames, or at once with ``drop``."""
        if self.error is None:
            self.error = error
        if drop:
            self.clear()
        self._wake()

    def clear(self) -> None:
        self.frames.clear()
        self.buffered = 0

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self, timeout: float) -> Received:
        """The next frame's type and payload; raises the stream's error once the queued frames
        are taken, or :class:`TimeoutError` when none arrives within ``timeout`` seconds."""
        while not self.frames:
            if self.error is not None:
                raise self.error
            loop = asyncio.get_running_loop()
            waiter = self.waiter = loop.create_future()
            timer = loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self.waiter = None
        frame = self.frames.popleft()
        self.buffered -= len(frame[1])
        return frame


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class FrameConnection(asyncio.Protocol):
    """One control connection: frames in (parsed in ``data_received``), frames out.

    ``dispatch(stream_id, (type, payload))`` receives every complete frame, in order; it must not
    block. ``max_payload`` caps a frame's declared length (a larger header drops the connection);
    ``frame_timeout`` bounds how long a frame that has started may take to complete.
    """

    def __init__(
        self,
        dispatch: Callable[[int, Received], None],
        *,
        max_payload: int,
        frame_timeout: float,
    ) -> None:
        self._dispatch = dispatch
        self._max_payload = max_payload
        self._frame_timeout = frame_timeout
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._buffer = bytearray()
        self._partial_since = 0.0  # when the incomplete frame in the buffer started
        self._frame_timer: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []

    # asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        had_partial = bool(buffer)
        # frames are cut from ``data`` itself when nothing is pending (the common case)
        source: bytes | bytearray = data
        if had_partial:
            buffer += data
            source = buffer
        size = len(source)
        position = 0
        try:
            while size - position >= HEADER_SIZE:
                kind, stream_id, length = decode_header(
                    bytes(source[position : position + HEADER_SIZE]), max_payload=self._max_payload
                )
                end = position + HEADER_SIZE + length
                if end > size:
                    break
                self._dispatch(stream_id, (kind, bytes(source[position + HEADER_SIZE : end])))
                position = end
        except FrameError as exc:
            # a bad header: the byte stream cannot be resynchronised; drop the connection
            logger.warning("enclave link: bad frame from the enclave (%s); reconnecting", exc)
            self.abort()
            return
        if had_partial:
            del buffer[:position]
        elif position < size:
            buffer += data[position:]
        if buffer and (position or not had_partial):
            self._partial_since = self._loop.time()
            if self._frame_timer is None:
                self._frame_timer = self._loop.call_later(
                    self._frame_timeout, self._check_frame_deadline
                )

    def _check_frame_deadline(self) -> None:
        self._frame_timer = None
        if not self._buffer or self.transport is None:
            return
        elapsed = self._loop.time() - self._partial_since
        if elapsed < self._frame_timeout:
            delay = self._frame_timeout - elapsed
            self._frame_timer = self._loop.call_later(delay, self._check_frame_deadline)
            return
        logger.warning("enclave link: a frame did not complete within %s s", elapsed)
        self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._frame_timer is not None:
            self._frame_timer.cancel()
            self._frame_timer = None
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("connection lost"))
        self._drain_waiters.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # ours ----------------------------------------------------------------------------------------

    async def send(self, data: bytes, timeout: float) -> None:
        """Write ``data``; wait (up to ``timeout`` s) for the transport to drain. On the deadline
        the connection is aborted (its frames cannot be recalled) and TimeoutError raised."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("connection lost")
        transport.write(data)
        if self._write_paused:
            waiter = self._loop.create_future()
            self._drain_waiters.append(waiter)
            try:
                async with asyncio.timeout(timeout):
                    await waiter
            except TimeoutError:
                self.abort()  # the enclave stopped reading
                raise

    def write_now(self, data: bytes) -> bool:
        """Write ``data`` without waiting for the transport to drain (a tiny frame, from code
        that may be cancelled); False when the connection is closing or gone."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        transport.write(data)
        return True

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
