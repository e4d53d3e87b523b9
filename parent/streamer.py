"""The parent's sealed-bundle streamer: ciphertext from a folder or S3 to the enclave, in frames.

The parent is untrusted and handles only ciphertext and public data; the bundle's sources and
layout are in :mod:`parent.bundlesource`.

Protocol, per connection (the enclave connects; ``stream_id`` of the request is echoed)::

    enclave → parent   BUNDLE_REQUEST {"bundle": name, "from_chunk": k}
    parent → enclave   BUNDLE_MANIFEST manifest bytes, verbatim
                       BUNDLE_CHUNK index ‖ sealed chunk, verbatim, for index = k .. chunk_count-1
                       BUNDLE_END {"chunk_count": n}
    on any failure     ERROR {"code", "message"}, then the parent closes the connection

Error codes: ``BadRequest`` (malformed request, from_chunk past the end), ``UnexpectedFrame``,
``UnknownBundle``, ``MalformedBundle`` (the stored bundle breaks its layout, or a chunk does not
fit a frame), ``SourceError`` (storage failed), ``Busy`` (over ``max_connections``).

Resume is a new connection with a later ``from_chunk``. Memory is bounded: at most two chunks per
connection are held (the one being written, the one being read ahead), writes wait on ``drain()``,
and connections above ``max_connections`` are refused. Logs carry counts and sizes only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

from parent.bundlesource import BundleLayout, BundleSource
from protocol.errors import ConfigError, FrameError, MalformedBundle, ProtocolError, TransportError
from protocol.frames import (
    DEFAULT_MAX_PAYLOAD,
    BundleChunk,
    BundleEnd,
    BundleRequest,
    ConnectionClosed,
    ErrorPayload,
    Frame,
    FrameType,
    read_frame,
    write_frame,
)
from protocol.transport import Address, start_server

__all__ = ["BundleStreamer"]

logger = logging.getLogger(__name__)

_CHUNK_INDEX_SIZE: Final = 8
_REQUEST_MAX_PAYLOAD: Final = 4096
_Arg = TypeVar("_Arg")
_Result = TypeVar("_Result")


# -- the server --------------------------------------------------------------------------------


class _Refused(Exception):
    """Ends a connection with an ERROR frame; ``code`` and ``message`` carry no content."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class BundleStreamer:
    """Serves sealed bundles to the enclave over ``address`` (``vsock://3:PORT`` on AWS, where the
    parent listens and the enclave connects; ``unix://...`` locally).

    ``sources`` maps the bundle names the enclave may ask for to their sources. Use as
    ``async with BundleStreamer(...) as streamer: ...`` or ``await start()`` / ``await close()``.
    """

    def __init__(
        self,
        address: Address,
        sources: Mapping[str, BundleSource],
        *,
        max_connections: int = 8,
        request_timeout: float = 10.0,
        write_timeout: float = 60.0,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        unix_mode: int = 0o660,
    ) -> None:
        if type(max_connections) is not int or max_connections < 1:
            raise ConfigError("max_connections must be at least 1")
        if type(max_payload) is not int or not 1024 <= max_payload <= 0xFFFF_FFFF:
            raise ConfigError("max_payload must be an integer in 1024..2**32-1")
        for name, value in (("request_timeout", request_timeout), ("write_timeout", write_timeout)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"{name} must be a positive number of seconds")
        self._address = address
        self._sources = dict(sources)
        self._max_connections = max_connections
        self._request_timeout = float(request_timeout)
        self._write_timeout = float(write_timeout)
        self._max_payload = max_payload
        self._unix_mode = unix_mode
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # every open connection's handler
        self._active = 0  # connections being served (not refused as Busy)
        self._in_flight = 0
        self.peak_in_flight = 0
        """Most sealed chunks held in memory at once, over all connections (for tests, metrics)."""
        self.served = 0
        """Connections that received a whole stream, up to BUNDLE_END."""

    @property
    def address(self) -> Address:
        return self._address

    @property
    def active_connections(self) -> int:
        return self._active

    async def start(self) -> None:
        if self._server is not None:
            raise ConfigError("the streamer is already started")
        self._server = await start_server(self._address, self._handle, unix_mode=self._unix_mode)
        logger.info(
            "bundle streamer listening on %s (%d bundles)", self._address, len(self._sources)
        )

    async def close(self) -> None:
        """Stop listening and end every open connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> BundleStreamer:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection; everything read here comes from the enclave side, untrusted."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if self._active >= self._max_connections:
                logger.warning("bundle streamer busy: %d connections", self._active)
                await self._send_error(writer, 0, "Busy", "too many connections; retry later")
                return
            self._active += 1
            try:
                await self._serve(reader, writer)
            finally:
                self._active -= 1
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()  # flushes what is buffered, then closes
            try:
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
            except TimeoutError:
                writer.transport.abort()  # a peer that stopped reading does not keep it open
            except OSError:
                pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream_id = 0
        try:
            # (1) one BUNDLE_REQUEST within the request deadline
            request_frame = await read_frame(
                reader, max_payload=_REQUEST_MAX_PAYLOAD, timeout=self._request_timeout
            )
            stream_id = request_frame.stream_id
            if request_frame.type is not FrameType.BUNDLE_REQUEST:
                raise _Refused(
                    "UnexpectedFrame", f"expected BUNDLE_REQUEST, got {request_frame.type.name}"
                )
            try:
                request = BundleRequest.decode(request_frame.payload)
            except FrameError as exc:
                raise _Refused("BadRequest", str(exc)) from None
            # (2) a bundle we know, (3) a layout that holds, (4) a start inside it
            source = self._sources.get(request.bundle)
            if source is None:
                logger.info("bundle request for an unknown name (%d chars)", len(request.bundle))
                raise _Refused("UnknownBundle", "no bundle of that name on this parent")
            manifest, layout = await asyncio.to_thread(_from_source, _load, source)
            if len(manifest) > self._max_payload:
                raise _Refused("MalformedBundle", "manifest does not fit in a frame")
            if _CHUNK_INDEX_SIZE + layout.max_sealed_chunk > self._max_payload:
                raise _Refused("MalformedBundle", "chunk_size does not fit in a frame")
            if request.from_chunk > layout.chunk_count:
                raise _Refused(
                    "BadRequest", f"from_chunk is beyond chunk_count {layout.chunk_count}"
                )
            # (5) manifest, chunks in order, end
            await self._write(writer, Frame(FrameType.BUNDLE_MANIFEST, stream_id, manifest))
            sent = await self._stream_chunks(writer, source, layout, request.from_chunk, stream_id)
            await self._write(writer, BundleEnd(layout.chunk_count).frame(stream_id))
            self.served += 1
            logger.info(
                "bundle %s: sent %d chunks (%d bytes) from chunk %d",
                request.bundle,
                layout.chunk_count - request.from_chunk,
                sent,
                request.from_chunk,
            )
        except ConnectionClosed:
            logger.debug("bundle streamer: peer closed the connection")
        except FrameError as exc:
            logger.info("bundle streamer: bad frame (%s)", exc)
            await self._send_error(writer, stream_id, "BadRequest", str(exc))
        except TransportError as exc:  # the enclave's connection (source errors are _Refused)
            logger.info("bundle streamer: transport ended (%s)", exc)
        except _Refused as refusal:
            await self._send_error(writer, stream_id, refusal.code, refusal.message)

    async def _stream_chunks(
        self,
        writer: asyncio.StreamWriter,
        source: BundleSource,
        layout: BundleLayout,
        start: int,
        stream_id: int,
    ) -> int:
        """Send chunks ``start..`` in order, reading one ahead: at most two chunks held."""
        sent = 0
        index = start
        ahead = self._read_ahead(source, index) if index < layout.chunk_count else None
        try:
            while ahead is not None:
                sealed = await ahead
                following = index + 1
                ahead = (
                    self._read_ahead(source, following) if following < layout.chunk_count else None
                )
                try:
                    await self._write(writer, BundleChunk(index, sealed).frame(stream_id))
                finally:
                    self._in_flight -= 1
                sent += len(sealed)
                index = following
        finally:
            # an abandoned read: cancel it (its callback releases it) or release its result here
            if (
                ahead is not None
                and not ahead.cancel()
                and not ahead.cancelled()
                and ahead.exception() is None
            ):
                self._in_flight -= 1
        return sent

    def _read_ahead(self, source: BundleSource, index: int) -> asyncio.Task[bytes]:
        self._in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        task = asyncio.create_task(asyncio.to_thread(_from_source, source.read_chunk, index))
        task.add_done_callback(self._release_unused)
        return task

    def _release_unused(self, task: asyncio.Task[bytes]) -> None:
        # a read that failed or was cancelled holds no chunk (retrieving the error here also keeps
        # asyncio from reporting it as never retrieved when nobody awaits the task)
        if task.cancelled() or task.exception() is not None:
            self._in_flight -= 1

    async def _write(self, writer: asyncio.StreamWriter, frame: Frame) -> None:
        await write_frame(writer, frame, timeout=self._write_timeout, max_payload=self._max_payload)

    async def _send_error(
        self, writer: asyncio.StreamWriter, stream_id: int, code: str, message: str
    ) -> None:
        with contextlib.suppress(TransportError):
            frame = ErrorPayload(code, message[:1024]).frame(stream_id)
            await write_frame(writer, frame, timeout=min(self._write_timeout, 5.0))


def _load(source: BundleSource) -> tuple[bytes, BundleLayout]:
    return source.manifest(), source.layout()


def _from_source(function: Callable[[_Arg], _Result], argument: _Arg) -> _Result:
    """Call the source (in a worker thread); turn its failures into ERROR frames for the enclave.

    The source's own message stays in the parent's log unless it is a layout rule
    (:class:`MalformedBundle` names a field and a rule, never content).
    """
    try:
        return function(argument)
    except MalformedBundle as exc:
        logger.warning("bundle streamer: malformed bundle (%s)", exc)
        raise _Refused("MalformedBundle", str(exc)) from None
    except ProtocolError as exc:
        logger.warning("bundle streamer: source failed (%s)", exc)
        raise _Refused("SourceError", "the bundle source failed") from None
    except Exception as exc:  # noqa: BLE001 - boundary: a broken source must not end the server
        logger.error("bundle streamer: unexpected %s from the source", type(exc).__name__)
        raise _Refused("SourceError", "the bundle source failed") from None
