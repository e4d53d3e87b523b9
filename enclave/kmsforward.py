"""The enclave's loopback forwarder to KMS: TCP on 127.0.0.1, piped to the parent's KMS relay.

An enclave has no network: its only way out is vsock to the parent. boto3 speaks TCP, so the
enclave listens on ``127.0.0.1:PORT`` (an ephemeral port) and pipes every accepted connection,
byte for byte, to the ``kms_relay`` address (``vsock://3:PORT`` on AWS, ``unix://…`` locally),
where the parent's blind relay carries it on to KMS: the vsock-proxy pattern. On AWS boto3 talks
TLS to ``https://kms.REGION.amazonaws.com:PORT`` (the name resolves to 127.0.0.1 in the image), so
the parent only ever sees TLS records; locally the endpoint is plain HTTP to the local KMS.

Bounds: at most ``max_connections`` piped connections (more are closed at once; boto3 retries),
``connect_timeout`` to reach the relay, and ``idle_timeout``: a connection on which no byte moved
in either direction for that long is closed. Writes wait for the receiver (``drain``) within the
same deadline, so a stalled side cannot grow our buffers. Closing waits at most ``close_timeout``
for the peer to take what is still buffered, then aborts the connection: a peer that stopped
reading cannot hold a connection slot. Only counts are logged, never bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from enclave._closing import close_within
from enclave.errors import ConfigError
from protocol.errors import TransportError
from protocol.transport import Address, open_connection, start_server

__all__ = ["ForwarderStats", "KmsForwarder"]

log = logging.getLogger(__name__)

_READ_SIZE: Final = 64 * 1024


@dataclass
class ForwarderStats:
    """Counters (never content): connections accepted, refused over the limit, whose relay
    connection failed, and open now."""

    accepted: int = 0
    refused: int = 0
    relay_failures: int = 0
    active: int = 0


class KmsForwarder:
    """Pipe loopback TCP connections to ``target`` (the parent's KMS relay).

    ``listen`` is where to accept: by default ``127.0.0.1`` on an ephemeral port (read it from
    :attr:`port` after :meth:`start`). Use ``async with KmsForwarder(...) as forwarder:`` or
    :meth:`start` / :meth:`close`.
    """

    def __init__(
        self,
        target: Address,
        *,
        listen: Address | None = None,
        max_connections: int = 16,
        connect_timeout: float = 10.0,
        idle_timeout: float = 120.0,
        close_timeout: float = 5.0,
    ) -> None:
        if type(max_connections) is not int or max_connections < 1:
            raise ConfigError("max_connections must be at least 1")
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("idle_timeout", idle_timeout),
            ("close_timeout", close_timeout),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"{name} must be a positive number of seconds")
        self._target = target
        self._listen = listen
        self._max_connections = max_connections
        self._connect_timeout = float(connect_timeout)
        self._idle_timeout = float(idle_timeout)
        self._close_timeout = float(close_timeout)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._port = 0
        self.stats = ForwarderStats()

    @property
    def port(self) -> int:
        """The loopback TCP port boto3 connects to (0 before :meth:`start`, or with a ``listen``
        address)."""
        return self._port

    async def start(self) -> None:
        if self._server is not None:
            raise ConfigError("the forwarder is already started")
        if self._listen is None:
            try:
                server = await asyncio.start_server(self._accept, host="127.0.0.1", port=0)
            except OSError as exc:
                raise TransportError(f"listen on 127.0.0.1: {exc.strerror}") from None
            self._server = server
            self._port = int(server.sockets[0].getsockname()[1])
        else:
            self._server = await start_server(self._listen, self._accept)
        log.info("KMS forwarder listening; relay %s", self._target.kind)

    async def close(self) -> None:
        """Stop accepting and close every piped connection; idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> KmsForwarder:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None:  # pragma: no cover (a handler always runs in a task)
            return
        self._tasks.add(task)
        try:
            # (1) bounded: one connection over the limit is closed at once
            if self.stats.active >= self._max_connections:
                self.stats.refused += 1
                log.warning("KMS forwarder: %d connections open; refused one", self.stats.active)
                return
            self.stats.accepted += 1
            self.stats.active += 1
            try:
                await self._forward(reader, writer)
            except asyncio.CancelledError:
                pass  # close() cancelled us; ending normally keeps asyncio's stream callback quiet
            finally:
                self.stats.active -= 1
        finally:
            await close_within(writer, self._close_timeout)
            self._tasks.discard(task)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # (2) one relay connection per client connection, within the connect deadline
        try:
            relay_reader, relay_writer = await open_connection(
                self._target, timeout=self._connect_timeout
            )
        except TransportError as exc:
            self.stats.relay_failures += 1
            log.warning("KMS forwarder: relay unreachable (%s)", type(exc).__name__)
            return
        activity = _Activity()
        try:
            # (3) both directions until each has ended; an error on either closes both
            up = asyncio.create_task(self._pipe(reader, relay_writer, activity))
            down = asyncio.create_task(self._pipe(relay_reader, writer, activity))
            try:
                done, pending = await asyncio.wait({up, down}, return_when=asyncio.FIRST_EXCEPTION)
            except asyncio.CancelledError:
                up.cancel()
                down.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
                raise
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.info(
                        "KMS forwarder: connection closed (%s)", type(task.exception()).__name__
                    )
        finally:
            await close_within(relay_writer, self._close_timeout)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, activity: _Activity
    ) -> None:
        while True:
            try:
                async with asyncio.timeout(self._idle_timeout):
                    data = await reader.read(_READ_SIZE)
            except TimeoutError:
                if activity.idle_for() < self._idle_timeout:
                    continue  # the other direction is busy: the connection is not idle
                raise TransportError("idle timeout") from None
            if not data:
                # half-close: pass the end on, keep the other direction going
                if writer.can_write_eof():
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return
            activity.touch()
            writer.write(data)
            try:
                async with asyncio.timeout(self._idle_timeout):
                    await writer.drain()
            except TimeoutError:
                raise TransportError("the receiver stalled") from None


class _Activity:
    """When a byte last moved on a piped connection, in either direction."""

    def __init__(self) -> None:
        self._last = time.monotonic()

    def touch(self) -> None:
        self._last = time.monotonic()

    def idle_for(self) -> float:
        return time.monotonic() - self._last
