"""The enclave's request server: the parent's control connection (docs/request-path.md).

The parent connects to the enclave's control address; each connection carries frames multiplexed
by ``stream_id``, and the enclave handles streams concurrently:

``HEALTH_PING``          → ``HEALTH_PONG`` with the boot state and counters (never content)
``CREDENTIALS``          (stream 0) stored for the boot's KMS calls; no answer
``ATTESTATION_REQUEST``  → ``ATTESTATION_RESPONSE``: an NSM document binding the consumer's nonce,
                         the OHTTP public key and :func:`attestation_user_data`
``INFER_REQUEST``        → ``INFER_RESPONSE_CHUNK``… ``INFER_RESPONSE_END``: the request is
                         decapsulated, run through the runtime and encapsulated for the consumer
``ERROR`` (from parent)  cancels that open stream (the consumer left); no answer
any failure              → one ``ERROR`` ``{"code", "message"}`` on the stream, which ends it

Everything that arrives here comes from the untrusted parent. Decapsulation, parsing, generation
and encapsulation run in a worker thread (at most ``max_concurrency`` at once; the next request is
refused ``busy``), which hands the sealed chunks to the event loop as they are produced; the event
loop only ever holds ciphertext. A request frame on a stream id that is already open is a protocol
error: the open stream is cancelled and answered ``malformed``.

Lengths and replays (what the parent can still learn from ciphertext): a single answer is padded
to its size class and every streamed piece to a multiple of 64 bytes (:mod:`protocol.inference`),
so lengths no longer spell the answer. A request whose encapsulated key (``enc``) the current
OHTTP key has already served is a replay and is answered ``malformed``: the parent cannot collect
more samples of one request's answer. The record of served requests is bounded
(``replay_capacity``); the request that fills it is its key's last: the key is replaced by a fresh
one with a different key id (:meth:`EnclaveServer.rotate_key`), health reports the new key id,
documents carry the new key, and requests for the old one get ``unknown_key`` (consumers
re-attest).

Connections: at most ``max_connections`` coexist (a reconnecting parent is served at once, while
the old connection's death is still being noticed); each has its own streams (at most
``max_streams`` inference and, apart, ``max_attestation_streams`` attestation streams, so that
attestations the parent gave up on cannot make inference ``busy``), and losing a connection
cancels all of its streams, which stops their generation at the next piece. Reads:
waiting for a frame's first byte is bounded by ``idle_timeout`` only while the connection has no
open stream; the rest of the frame must arrive within ``frame_timeout``. A frame over its type's
size limit is read and discarded (up to :data:`MAX_DISCARD` bytes, within the frame deadline) and
answered ``too_large``; a larger one closes the connection. Writes are serialized per connection
and each has a deadline (``write_timeout``); a failed write aborts the connection, and closing
one waits at most ``write_timeout`` for the parent to take what is buffered, so a parent that
stopped reading cannot hold a connection slot.

Logs and counters carry stream ids, codes, sizes and error types only: never prompts, images,
completions, keys or credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Final

from enclave._closing import close_within
from enclave._echo import EchoRuntime, Generation, Runtime
from enclave._health import BOOT_STEPS, HealthState, ServerStats
from enclave._job import Job, Refused, Replayed
from enclave._serving import (
    DEFAULT_REPLAY_CAPACITY,
    OhttpKey,
    Ready,
    ReplayGuard,
    attestation_user_data,
)
from enclave.errors import ConfigError
from protocol.control import (
    ERROR_CODES,
    MAX_CONTROL_PAYLOAD,
    MAX_INFER_REQUEST,
    Credentials,
    Health,
    InferRequest,
    check_nonce,
)
from protocol.errors import FrameError, TransportError
from protocol.frames import (
    HEADER_SIZE,
    ConnectionClosed,
    ErrorPayload,
    Frame,
    FrameType,
    decode_header,
    write_frame,
)
from protocol.transport import Address, start_server

__all__ = [
    "BOOT_STEPS",
    "DEFAULT_REPLAY_CAPACITY",
    "MAX_DISCARD",
    "EchoRuntime",
    "EnclaveServer",
    "Generation",
    "HealthState",
    "OhttpKey",
    "Ready",
    "Runtime",
    "ServerStats",
    "attestation_user_data",
]

log = logging.getLogger(__name__)

MAX_DISCARD: Final = 32 * 1024 * 1024 + 64
"""The largest oversized frame that is read, discarded and answered; a larger one closes the
connection."""

_U32_MAX: Final = 0xFFFF_FFFF  # a frame's largest length field
_MESSAGES: Final = {
    "unknown_key": "the request is for another key; fetch a new attestation document",
    "malformed": "the request could not be decapsulated or is not a valid inference request",
    "not_ready": "the enclave has not finished booting",
    "busy": "the enclave is serving its maximum number of requests; retry later",
    "too_large": "the request is larger than the enclave accepts",
    "internal": "the enclave could not answer this request",
}


# --- The server ------------------------------------------------------------------------------


class EnclaveServer:
    """Listen on the control ``address`` and answer the parent (see the module docstring).

    Until :meth:`set_ready` the enclave answers health and stores credentials; consumers' requests
    get ``not_ready``. Use ``await start()`` / ``await close()``.
    """

    def __init__(
        self,
        address: Address,
        *,
        max_concurrency: int = 2,
        max_connections: int = 4,
        max_streams: int = 256,
        max_attestation_streams: int = 32,
        frame_timeout: float = 30.0,
        write_timeout: float = 30.0,
        idle_timeout: float = 600.0,
        replay_capacity: int = DEFAULT_REPLAY_CAPACITY,
    ) -> None:
        for name, count in (
            ("max_concurrency", max_concurrency),
            ("max_connections", max_connections),
            ("max_streams", max_streams),
            ("max_attestation_streams", max_attestation_streams),
            ("replay_capacity", replay_capacity),
        ):
            if type(count) is not int or count < 1:
                raise ConfigError(f"{name} must be a positive integer")
        for name, value in (
            ("frame_timeout", frame_timeout),
            ("write_timeout", write_timeout),
            ("idle_timeout", idle_timeout),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"{name} must be a positive number of seconds")
        self._address = address
        self.max_concurrency = max_concurrency
        self._max_connections = max_connections
        self.max_streams = max_streams
        self.max_attestation_streams = max_attestation_streams
        self.replay_capacity = replay_capacity
        self.frame_timeout = float(frame_timeout)
        self.write_timeout = float(write_timeout)
        self.idle_timeout = float(idle_timeout)
        self.health = HealthState()
        self.stats = ServerStats()
        # what serving reads, swapped as one: the state handed over at boot step 6 (with the
        # current OHTTP key) and the record of the requests that key has served
        self._serving: tuple[Ready, ReplayGuard] | None = None
        self._rotation_lock = threading.Lock()
        self._credentials: Credentials | None = None
        self._credentials_event = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="nci-infer")
        self._attest_limit = asyncio.Semaphore(2)

    # -- lifecycle --

    async def start(self) -> None:
        if self._server is not None:
            raise ConfigError("the server is already started")
        self._server = await start_server(self._address, self._accept)
        log.info("control server listening (%s)", self._address.kind)

    async def close(self) -> None:
        """Stop accepting, cancel every connection (and so every generation); idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- what boot reads and sets --

    @property
    def credentials(self) -> Credentials | None:
        """The latest CREDENTIALS from the parent, if any."""
        return self._credentials

    async def wait_credentials(self) -> Credentials:
        """The latest credentials, once the parent has sent some."""
        await self._credentials_event.wait()
        if self._credentials is None:  # pragma: no cover (the event is set with them)
            raise ConfigError("credentials event without credentials")
        return self._credentials

    @property
    def ready_state(self) -> Ready | None:
        """What the server serves with (its ``key`` is the current OHTTP key), once ready."""
        serving = self._serving
        return None if serving is None else serving[0]

    def set_ready(self, ready: Ready) -> None:
        """Boot step 6: serve consumers with ``ready``'s runtime, key and NSM from now on."""
        self.health.ready(ready.key.key_id)
        self._serving = (ready, ReplayGuard(self.replay_capacity))
        log.info("ready: OHTTP key id %d", ready.key.key_id)

    def rotate_key(self, current: OhttpKey | None = None) -> OhttpKey:
        """Replace the OHTTP key with a fresh one whose key id differs from the old one; requests
        for the old key are answered ``unknown_key`` from now on (consumers re-attest, and get
        the new key in the document). With ``current``, only if it is still the key in use
        (several workers may find the same key's replay record full). Thread-safe."""
        with self._rotation_lock:
            serving = self._serving
            if serving is None:
                raise ConfigError("no key to rotate before the server is ready")
            ready, guard = serving
            if current is not None and ready.key is not current:
                return ready.key
            key = OhttpKey.generate(exclude=ready.key.key_id)
            self._serving = (dataclasses.replace(ready, key=key), ReplayGuard(self.replay_capacity))
            guard.retire()
            self.health.rotated(key.key_id)
            self.stats.key_rotations += 1
        log.info("OHTTP key id %d replaced by key id %d", ready.key.key_id, key.key_id)
        return key

    def health_snapshot(self) -> Health:
        return self.health.snapshot(active=self.stats.active, served=self.stats.served)

    # -- connections --

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None:  # pragma: no cover (a handler always runs in a task)
            return
        if len(self._connections) >= self._max_connections:
            log.warning("%d control connections open; refused one", len(self._connections))
            writer.close()
            return
        self._connections.add(task)
        self.stats.connections += 1
        try:
            await _Connection(self, reader, writer).run()
        except asyncio.CancelledError:
            pass  # close() cancelled us; ending normally keeps asyncio's stream callback quiet
        finally:
            self._connections.discard(task)

    def store_credentials(self, frame: Frame) -> None:
        """Keep the credentials of a CREDENTIALS ``frame`` (from the untrusted parent: a bad one
        is logged by error type and dropped; there is no answer either way)."""
        if frame.stream_id != 0:
            log.warning(
                "CREDENTIALS on stream %d refused: they travel on stream 0", frame.stream_id
            )
            return
        try:
            credentials = Credentials.decode(frame.payload)
        except FrameError:
            log.warning("CREDENTIALS refused (FrameError)")
            return
        self._credentials = credentials
        self._credentials_event.set()
        log.info("credentials received")

    # -- the work of one stream (called from _Connection) --

    async def attest(self, payload: bytes) -> bytes:
        """An attestation document for the consumer's nonce in ``payload`` (untrusted)."""
        try:
            nonce = check_nonce(payload)
        except FrameError:
            raise Refused("malformed") from None
        serving = self._serving
        if serving is None:
            raise Refused("not_ready")
        ready = serving[0]
        async with self._attest_limit:
            document = await asyncio.to_thread(
                ready.nsm.attestation,
                nonce=nonce,
                public_key=ready.key.public_key,
                user_data=ready.user_data,
            )
        self.stats.attestations += 1
        return document

    def admit(self, payload: bytes) -> Job:
        """Check an INFER_REQUEST payload (untrusted) and take a concurrency slot: the job to
        run, with the current key and its replay record."""
        self.stats.requests += 1
        try:
            request = InferRequest.decode(payload)
        except FrameError:
            raise Refused("malformed") from None
        serving = self._serving
        if serving is None:
            raise Refused("not_ready")
        if self.stats.active >= self.max_concurrency:
            raise Refused("busy")
        self.stats.active += 1
        ready, guard = serving
        return Job(asyncio.get_running_loop(), ready, guard, request, self._rotate_full)

    def _rotate_full(self, key: OhttpKey) -> None:
        # a worker thread found ``key``'s replay record full
        self.rotate_key(key)

    def run_job(self, job: Job) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().run_in_executor(self._pool, job.run)
        future.add_done_callback(self._job_done)
        return future

    def _job_done(self, future: asyncio.Future[None]) -> None:
        self.stats.active -= 1
        if not future.cancelled():
            future.exception()  # retrieved: job.run catches everything, this is belt and braces


class _Connection:
    """One control connection: a read loop and a task per open stream."""

    def __init__(
        self, server: EnclaveServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._server = server
        self._reader = reader
        self._writer = writer
        self._write_lock = asyncio.Lock()
        self._streams: dict[int, asyncio.Task[None]] = {}
        self._attestations: set[int] = set()  # the streams of _streams that are attestations

    async def run(self) -> None:
        log.info("control connection opened")
        reason = "closed by the parent"
        try:
            while True:
                frame = await self._next_frame()
                if frame is not None:
                    await self._dispatch(frame)
        except ConnectionClosed:
            pass
        except (TransportError, FrameError) as exc:
            reason = type(exc).__name__
        finally:
            streams = list(self._streams.values())
            for task in streams:
                task.cancel()
            if streams:
                await asyncio.gather(*streams, return_exceptions=True)
            # a parent that stopped reading must not hold the connection's slot: bounded flush
            await close_within(self._writer, self._server.write_timeout)
            log.info("control connection ended (%s); %d streams cancelled", reason, len(streams))

    async def _next_frame(self) -> Frame | None:
        """The next frame (untrusted), or ``None`` when an oversized one was answered."""
        # (1) the first byte: an idle parent is waited for, bounded only when no stream is open
        idle = None if self._streams else self._server.idle_timeout
        try:
            async with asyncio.timeout(idle):
                first = await self._reader.readexactly(1)
        except asyncio.IncompleteReadError:
            raise ConnectionClosed() from None
        except TimeoutError:
            raise TransportError(f"no frame within {idle} s on an idle connection") from None
        except OSError as exc:
            raise TransportError(f"read failed: {type(exc).__name__}") from None
        # (2) the rest of the frame within one deadline; the header is checked before the payload
        try:
            async with asyncio.timeout(self._server.frame_timeout):
                header = first + await self._reader.readexactly(HEADER_SIZE - 1)
                frame_type, stream_id, length = decode_header(header, max_payload=_U32_MAX)
                if length > _payload_limit(frame_type):
                    if length > MAX_DISCARD:
                        raise FrameError(f"{frame_type.name} payload of {length} bytes")
                    await self._discard(length)
                    log.warning(
                        "stream %d: %s of %d bytes refused", stream_id, frame_type.name, length
                    )
                    await self._error(stream_id, "too_large")
                    return None
                payload = await self._reader.readexactly(length) if length else b""
        except asyncio.IncompleteReadError:
            raise TransportError("connection closed inside a frame") from None
        except TimeoutError:
            raise TransportError(
                f"no complete frame within {self._server.frame_timeout} s"
            ) from None
        except OSError as exc:
            raise TransportError(f"read failed: {type(exc).__name__}") from None
        return Frame(frame_type, stream_id, payload)

    async def _discard(self, length: int) -> None:
        while length:
            length -= len(await self._reader.readexactly(min(length, 1 << 20)))

    async def _dispatch(self, frame: Frame) -> None:
        kind, stream_id = frame.type, frame.stream_id
        if kind == FrameType.HEALTH_PING:
            if frame.payload:
                await self._error(stream_id, "malformed")
            else:
                await self.send(self._server.health_snapshot().frame(stream_id))
        elif kind == FrameType.CREDENTIALS:
            self._server.store_credentials(frame)
        elif kind == FrameType.ERROR:
            # the parent cancels a stream (its consumer left); nothing is answered
            task = self._streams.get(stream_id)
            if task is not None:
                task.cancel()
        elif kind in (FrameType.ATTESTATION_REQUEST, FrameType.INFER_REQUEST):
            if stream_id == 0:
                await self._error(0, "malformed")
            elif stream_id in self._streams:
                # a second request on an open stream: a protocol error that ends the open one
                self._streams.pop(stream_id).cancel()
                self._attestations.discard(stream_id)
                await self._error(stream_id, "malformed")
            elif self._over_budget(kind):
                await self._error(stream_id, "busy")
            else:
                task = asyncio.create_task(self._stream(kind, stream_id, frame.payload))
                self._streams[stream_id] = task
                if kind == FrameType.ATTESTATION_REQUEST:
                    self._attestations.add(stream_id)
        else:
            log.warning("stream %d: unexpected %s from the parent", stream_id, kind.name)
            await self._error(stream_id, "malformed")

    def _over_budget(self, kind: FrameType) -> bool:
        # attestations and inference have budgets of their own: a flood of one (the parent not
        # cancelling the attestations it gave up on) cannot make the other busy
        attesting = len(self._attestations)
        if kind == FrameType.ATTESTATION_REQUEST:
            return attesting >= self._server.max_attestation_streams
        return len(self._streams) - attesting >= self._server.max_streams

    async def _stream(self, kind: FrameType, stream_id: int, payload: bytes) -> None:
        task = asyncio.current_task()
        try:
            if kind == FrameType.ATTESTATION_REQUEST:
                document = await self._server.attest(payload)
                await self.send(Frame(FrameType.ATTESTATION_RESPONSE, stream_id, document))
            else:
                await self._infer(stream_id, payload)
        except Refused as refused:
            if isinstance(refused, Replayed):
                self._server.stats.replays += 1
            await self._error(stream_id, refused.code)
        except TransportError:
            pass  # the connection is gone; its read loop ends the other streams
        except Exception as exc:  # noqa: BLE001 - the boundary: any failure is "internal"
            log.error("stream %d: %s failed (%s)", stream_id, kind.name, type(exc).__name__)
            with contextlib.suppress(TransportError):
                await self._error(stream_id, "internal")
        finally:
            if self._streams.get(stream_id) is task:
                del self._streams[stream_id]
                self._attestations.discard(stream_id)

    async def _infer(self, stream_id: int, payload: bytes) -> None:
        job = self._server.admit(payload)
        try:
            worker = self._server.run_job(job)
            chunks = 0
            while True:
                item = await job.queue.get()
                if isinstance(item, Refused):
                    raise item
                if item is None:
                    break
                await self.send(Frame(FrameType.INFER_RESPONSE_CHUNK, stream_id, item))
                job.window.release()
                chunks += 1
            await worker  # its slot is free (and counted so) before the parent hears the end
            self._server.stats.served += 1
            await self.send(Frame(FrameType.INFER_RESPONSE_END, stream_id, b""))
            log.debug("stream %d: answered (%d chunks)", stream_id, chunks)
        finally:
            job.cancel()  # a no-op when it finished; stops the generation when we were cancelled

    async def _error(self, stream_id: int, code: str) -> None:
        if code not in ERROR_CODES:  # pragma: no cover (our own codes)
            code = "internal"
        self._server.stats.errors[code] += 1
        await self.send(ErrorPayload(code, _MESSAGES[code]).frame(stream_id))

    async def send(self, frame: Frame) -> None:
        """Write one frame; writes are serialized. A failed write closes the connection."""
        async with self._write_lock:
            try:
                await write_frame(self._writer, frame, timeout=self._server.write_timeout)
            except TransportError:
                # nothing buffered will be taken: drop it; the read loop notices and cancels
                # every stream
                self._writer.transport.abort()
                raise


def _payload_limit(frame_type: FrameType) -> int:
    return 1 + MAX_INFER_REQUEST if frame_type == FrameType.INFER_REQUEST else MAX_CONTROL_PAYLOAD
