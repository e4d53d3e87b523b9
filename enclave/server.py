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

Connections: at most ``max_connections`` coexist (a reconnecting parent is served at once, while
the old connection's death is still being noticed); each has its own streams, and losing a
connection cancels all of its streams, which stops their generation at the next piece. Reads:
waiting for a frame's first byte is bounded by ``idle_timeout`` only while the connection has no
open stream; the rest of the frame must arrive within ``frame_timeout``. A frame over its type's
size limit is read and discarded (up to :data:`MAX_DISCARD` bytes, within the frame deadline) and
answered ``too_large``; a larger one closes the connection. Writes are serialized per connection
and each has a deadline (``write_timeout``); a failed write closes the connection.

Logs and counters carry stream ids, codes, sizes and error types only: never prompts, images,
completions, keys or credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Final, Protocol

from attestation.nsm import NsmClient
from enclave.errors import ConfigError, EnclaveError
from protocol.control import (
    ERROR_CODES,
    MAX_CONTROL_PAYLOAD,
    MAX_INFER_REQUEST,
    Credentials,
    Health,
    InferMode,
    InferRequest,
    UserData,
    check_nonce,
)
from protocol.errors import (
    DecapsulationError,
    FrameError,
    MalformedMessage,
    TransportError,
    UnknownKeyId,
)
from protocol.frames import (
    HEADER_SIZE,
    ConnectionClosed,
    ErrorPayload,
    Frame,
    FrameType,
    decode_header,
    write_frame,
)
from protocol.inference import (
    MAX_DELTA_BYTES,
    Image,
    InferenceResponse,
    Params,
    StreamDelta,
    StreamEnd,
    Usage,
    encode_stream_piece,
    http_response,
    parse_http_request,
)
from protocol.ohttp import (
    ServerContext,
    chunked_request_reader,
    decapsulate_request,
    generate_key_config,
)
from protocol.transport import Address, start_server

__all__ = [
    "BOOT_STEPS",
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

BOOT_STEPS: Final = ("nsm", "credentials", "key release and unlock", "model load", "ohttp key")
"""The boot steps 1..5 of docs/request-path.md; step 6 is ``ready``."""
_STEPS: Final = len(BOOT_STEPS) + 1

MAX_DISCARD: Final = 32 * 1024 * 1024 + 64
"""The largest oversized frame that is read, discarded and answered; a larger one closes the
connection."""

_U32_MAX: Final = 0xFFFF_FFFF
_PIECE_CHARS: Final = MAX_DELTA_BYTES // 4  # characters per delta: ≤ 64 KiB in any UTF-8
_HANDOFF_WINDOW: Final = 8  # sealed chunks a worker may run ahead of the socket
_MESSAGES: Final = {
    "unknown_key": "the request is for another key; fetch a new attestation document",
    "malformed": "the request could not be decapsulated or is not a valid inference request",
    "not_ready": "the enclave has not finished booting",
    "busy": "the enclave is serving its maximum number of requests; retry later",
    "too_large": "the request is larger than the enclave accepts",
    "internal": "the enclave could not answer this request",
}


# --- The runtime the server drives -------------------------------------------------------------


class Generation(Protocol):
    """Text pieces as the model produces them; the counters are set once it is exhausted."""

    def __iter__(self) -> Iterator[str]: ...

    def __next__(self) -> str: ...

    @property
    def finish_reason(self) -> str | None: ...

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def completion_tokens(self) -> int: ...


class Runtime(Protocol):
    """A loaded model (``enclave.models.runtime.load_runtime``), or :class:`EchoRuntime`.

    ``generate`` validates its input eagerly and raises an :class:`EnclaveError` subclass for a
    request the model refuses (answered ``malformed``). It is called from worker threads, up to
    ``max_concurrency`` at once.
    """

    def generate(
        self,
        prompt: str,
        images: Sequence[Image],
        params: Params,
        *,
        seed: int | None = None,
    ) -> Generation: ...


class EchoRuntime:
    """Echoes the prompt back, one word (with its trailing space) per piece, up to
    ``params.max_tokens`` pieces: a stand-in model for tests and load benchmarks. ``delay`` seconds
    of sleep per piece imitate a model's token latency."""

    def __init__(self, *, delay: float = 0.0) -> None:
        if isinstance(delay, bool) or not isinstance(delay, int | float) or delay < 0:
            raise ConfigError("delay must be a non-negative number of seconds")
        self._delay = float(delay)

    def generate(
        self,
        prompt: str,
        images: Sequence[Image],
        params: Params,
        *,
        seed: int | None = None,
    ) -> _EchoGeneration:
        words = re.findall(r"\s*\S+\s*|\s+", prompt)
        return _EchoGeneration(words, params.max_tokens, len(words) + len(images), self._delay)


class _EchoGeneration:
    def __init__(self, words: list[str], limit: int, prompt_tokens: int, delay: float) -> None:
        self._words = words
        self._limit = limit
        self._delay = delay
        self.finish_reason: str | None = None
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self.completion_tokens >= min(len(self._words), self._limit):
            self.finish_reason = "length" if self._limit < len(self._words) else "stop"
            raise StopIteration
        if self._delay:
            time.sleep(self._delay)
        word = self._words[self.completion_tokens]
        self.completion_tokens += 1
        return word


# --- What serving needs, once boot is done -------------------------------------------------------


@dataclass(frozen=True)
class OhttpKey:
    """The enclave's request-encryption key (boot step 5): X25519, with its RFC 9458 key
    configuration. The private key never leaves the enclave."""

    key_id: int
    private_key: bytes = field(repr=False)
    key_config: bytes

    @classmethod
    def generate(cls) -> OhttpKey:
        """A fresh key pair with a random key id (0..255)."""
        key_id = secrets.randbelow(256)
        private_key, key_config = generate_key_config(key_id)
        return cls(key_id, private_key, key_config)

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte X25519 public key (the attestation document's ``public_key``)."""
        return self.key_config[3:35]


def attestation_user_data(key_config: bytes, model_id: str, manifest_sha256: bytes) -> bytes:
    """The attestation document's ``user_data`` (:class:`protocol.control.UserData`)."""
    try:
        return UserData(key_config, model_id, manifest_sha256).encode()
    except FrameError as exc:
        raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class Ready:
    """Everything the server needs to serve consumers; handed over at boot step 6."""

    nsm: NsmClient
    runtime: Runtime
    key: OhttpKey
    model_id: str
    manifest_sha256: bytes

    @property
    def user_data(self) -> bytes:
        return attestation_user_data(self.key.key_config, self.model_id, self.manifest_sha256)


class HealthState:
    """Where the boot stands: ``booting`` at a step, ``ready``, or ``failed`` with a code.

    Boot steps are numbered 1..5 (:data:`BOOT_STEPS`); ``ready`` is step 6 of 6.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = "booting"
        self._step = 1
        self._error = ""
        self._key_id = 0

    def begin(self, step: int) -> None:
        """Boot step ``step`` (1-based) starts."""
        if not 1 <= step <= len(BOOT_STEPS):
            raise ConfigError(f"boot steps are 1..{len(BOOT_STEPS)}")
        with self._lock:
            if self._state != "booting":
                raise ConfigError(f"the boot is already {self._state}")
            self._step = step

    def fail(self, code: str) -> None:
        """The current step failed with error ``code``; the state stays failed."""
        with self._lock:
            self._state = "failed"
            self._error = code

    def ready(self, key_id: int) -> None:
        with self._lock:
            if self._state != "booting":
                raise ConfigError(f"the boot is already {self._state}")
            self._state = "ready"
            self._step = _STEPS
            self._key_id = key_id

    @property
    def state(self) -> str:
        return self._state

    @property
    def step(self) -> int:
        return self._step

    @property
    def error(self) -> str:
        return self._error

    def snapshot(self, *, active: int = 0, served: int = 0) -> Health:
        with self._lock:
            name = "ready" if self._state == "ready" else BOOT_STEPS[self._step - 1]
            return Health(
                state=self._state,
                step=self._step,
                steps=_STEPS,
                name=name,
                error=self._error,
                key_id=self._key_id,
                active=min(active, _U32_MAX),
                served=min(served, _U32_MAX),
            )


@dataclass
class ServerStats:
    """Counters of the control server; never content."""

    connections: int = 0
    requests: int = 0  # INFER_REQUEST frames received
    attestations: int = 0  # documents issued
    served: int = 0  # inference requests answered completely
    active: int = 0  # inference requests admitted whose worker has not finished
    errors: Counter[str] = field(default_factory=Counter)  # ERROR frames sent, by code


class _Refused(Exception):
    """A request is answered with ERROR ``code``."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


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
        frame_timeout: float = 30.0,
        write_timeout: float = 30.0,
        idle_timeout: float = 600.0,
    ) -> None:
        for name, count in (
            ("max_concurrency", max_concurrency),
            ("max_connections", max_connections),
            ("max_streams", max_streams),
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
        self.frame_timeout = float(frame_timeout)
        self.write_timeout = float(write_timeout)
        self.idle_timeout = float(idle_timeout)
        self.health = HealthState()
        self.stats = ServerStats()
        self._ready: Ready | None = None
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
        return self._ready

    def set_ready(self, ready: Ready) -> None:
        """Boot step 6: serve consumers with ``ready``'s runtime, key and NSM from now on."""
        self.health.ready(ready.key.key_id)
        self._ready = ready
        log.info("ready: OHTTP key id %d", ready.key.key_id)

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
            raise _Refused("malformed") from None
        ready = self._ready
        if ready is None:
            raise _Refused("not_ready")
        async with self._attest_limit:
            document = await asyncio.to_thread(
                ready.nsm.attestation,
                nonce=nonce,
                public_key=ready.key.public_key,
                user_data=ready.user_data,
            )
        self.stats.attestations += 1
        return document

    def admit(self, payload: bytes) -> tuple[Ready, InferRequest]:
        """Check an INFER_REQUEST payload (untrusted) and take a concurrency slot."""
        self.stats.requests += 1
        try:
            request = InferRequest.decode(payload)
        except FrameError:
            raise _Refused("malformed") from None
        ready = self._ready
        if ready is None:
            raise _Refused("not_ready")
        if self.stats.active >= self.max_concurrency:
            raise _Refused("busy")
        self.stats.active += 1
        return ready, request

    def run_job(self, job: _Job) -> asyncio.Future[None]:
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
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
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
                await self._error(stream_id, "malformed")
            elif len(self._streams) >= self._server.max_streams:
                await self._error(stream_id, "busy")
            else:
                task = asyncio.create_task(self._stream(kind, stream_id, frame.payload))
                self._streams[stream_id] = task
        else:
            log.warning("stream %d: unexpected %s from the parent", stream_id, kind.name)
            await self._error(stream_id, "malformed")

    async def _stream(self, kind: FrameType, stream_id: int, payload: bytes) -> None:
        task = asyncio.current_task()
        try:
            if kind == FrameType.ATTESTATION_REQUEST:
                document = await self._server.attest(payload)
                await self.send(Frame(FrameType.ATTESTATION_RESPONSE, stream_id, document))
            else:
                await self._infer(stream_id, payload)
        except _Refused as refused:
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

    async def _infer(self, stream_id: int, payload: bytes) -> None:
        ready, request = self._server.admit(payload)
        job = _Job(asyncio.get_running_loop(), ready, request)
        try:
            worker = self._server.run_job(job)
            chunks = 0
            while True:
                item = await job.queue.get()
                if isinstance(item, _Refused):
                    raise item
                if item is None:
                    break
                await self.send(Frame(FrameType.INFER_RESPONSE_CHUNK, stream_id, item))
                job.window.release()
                chunks += 1
            await worker  # its slot is free (and counted so) before the parent hears the end
            self._server.stats.served += 1
            await self.send(Frame(FrameType.INFER_RESPONSE_END, stream_id, b""))
            log.debug("stream %d: answered (mode %d, %d chunks)", stream_id, request.mode, chunks)
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
                self._writer.close()  # the read loop notices and cancels every stream
                raise


def _payload_limit(frame_type: FrameType) -> int:
    return 1 + MAX_INFER_REQUEST if frame_type == FrameType.INFER_REQUEST else MAX_CONTROL_PAYLOAD


# --- The worker: decapsulate, generate, encapsulate ----------------------------------------------


class _Cancelled(Exception):
    """The stream was cancelled: stop generating."""


class _Job:
    """One inference request, run in a worker thread. It hands each sealed chunk to the event loop
    through :attr:`queue` (then ``None`` at the end, or a :class:`_Refused`), at most
    ``_HANDOFF_WINDOW`` chunks ahead of the socket; :meth:`cancel` stops it at the next piece."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, ready: Ready, request: InferRequest
    ) -> None:
        self._loop = loop
        self._ready = ready
        self._request = request
        self.queue: asyncio.Queue[bytes | _Refused | None] = asyncio.Queue()
        self.window = threading.Semaphore(_HANDOFF_WINDOW)
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        if not self._cancelled.is_set():
            self._cancelled.set()
            self.window.release(_HANDOFF_WINDOW)  # wakes a worker waiting for the socket

    def run(self) -> None:
        outcome: _Refused | None = None
        try:
            self._run()
        except _Cancelled:
            pass
        except _Refused as refused:
            outcome = refused
        except Exception as exc:  # noqa: BLE001 - the boundary: any failure is "internal"
            log.error("inference failed (%s)", type(exc).__name__)
            outcome = _Refused("internal")
        self._post(outcome)

    def _post(self, item: bytes | _Refused | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self._loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _emit(self, sealed: bytes) -> None:
        self.window.acquire()
        self._check()
        self._post(sealed)

    def _check(self) -> None:
        if self._cancelled.is_set():
            raise _Cancelled

    def _run(self) -> None:
        key, mode = self._ready.key, self._request.mode
        # (1) decapsulate (RFC 9458 §4.3 / the chunked draft): the whole message is here
        try:
            if mode is InferMode.SINGLE:
                plaintext, context = decapsulate_request(
                    key.private_key, key.key_config, self._request.message
                )
            else:
                reader = chunked_request_reader(key.private_key, key.key_config)
                parts = reader.feed(self._request.message)
                parts.append(reader.close())
                plaintext, context = b"".join(parts), reader.context
        except UnknownKeyId:
            raise _Refused("unknown_key") from None
        except (DecapsulationError, MalformedMessage):
            raise _Refused("malformed") from None
        # (2) the BHTTP request and its CBOR body; the body's stream flag must match the mode
        try:
            inference = parse_http_request(plaintext)
        except MalformedMessage:
            raise _Refused("malformed") from None
        del plaintext
        if inference.params.stream != (mode is InferMode.CHUNKED):
            raise _Refused("malformed")
        self._check()
        # (3) the runtime validates eagerly: what it refuses is the consumer's input
        try:
            generation = self._ready.runtime.generate(
                inference.prompt, inference.images, inference.params
            )
        except EnclaveError:
            raise _Refused("malformed") from None
        try:
            if mode is InferMode.SINGLE:
                self._single(context, generation)
            else:
                self._chunked(context, generation)
        finally:
            close = getattr(generation, "close", None)
            if callable(close):
                close()

    def _pieces(self, generation: Generation) -> Iterator[str]:
        for piece in generation:
            self._check()
            yield piece

    def _single(self, context: ServerContext, generation: Generation) -> None:
        # (4a) mode 0: one message/ohttp-res holding the BHTTP 200 response
        text = "".join(self._pieces(generation))
        response = InferenceResponse(
            text=text,
            finish_reason=generation.finish_reason,  # type: ignore[arg-type]  # checked there
            usage=Usage(generation.prompt_tokens, generation.completion_tokens),
        )
        self._emit(context.encapsulate_response(http_response(response)))

    def _chunked(self, context: ServerContext, generation: Generation) -> None:
        # (4b) mode 1: the response nonce travels with the first chunk; one sealed chunk per
        # piece as it is produced; StreamEnd in the final chunk
        writer = context.chunked_response()
        for piece in self._pieces(generation):
            for start in range(0, len(piece), _PIECE_CHARS):
                delta = StreamDelta(piece[start : start + _PIECE_CHARS])
                self._emit(writer.chunk(encode_stream_piece(delta)))
        end = StreamEnd(
            finish_reason=generation.finish_reason,  # type: ignore[arg-type]  # checked there
            usage=Usage(generation.prompt_tokens, generation.completion_tokens),
        )
        self._emit(writer.final(encode_stream_piece(end)))
