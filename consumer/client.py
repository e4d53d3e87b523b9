"""The consumer's SDK: attest the enclave, encrypt the prompt to it, decrypt the completion.

::

    from consumer import Client
    with Client("http://127.0.0.1:8443", expect="expected-pcrs.yaml") as client:
        answer = client.generate("What shape is this?", images=["shape.png"])
        for piece in client.generate("Describe it.", images=["shape.png"], stream=True):
            print(piece, end="", flush=True)

Each request goes (docs/request-path.md):

1. attest, unless a verified attestation younger than ``max_age`` is cached: a fresh 32-byte
   nonce → ``GET /v1/attestation?nonce=HEX`` → :func:`consumer.attest.verify_attestation` (chain,
   expected PCRs, debug mode, nonce, age, user_data, key binding);
2. encapsulate the Binary HTTP request (RFC 9458 §4.3) to the attested key: ``message/ohttp-req``,
   or ``message/ohttp-chunked-req`` for a stream (the whole request in its final chunk);
3. ``POST /v1/infer``; a 422 ``ohttp-key`` problem (RFC 9458 §5.3) means the enclave's key
   changed: forget it, attest again, retry once;
4. decapsulate with this request's HPKE context (RFC 9458 §4.4; chunked draft "Response
   Encapsulation"): a response sealed for any other request, tampered, or cut short does not
   authenticate and is :class:`~consumer.errors.ResponseInvalid`. A stream yields each piece as its
   chunk authenticates and raises at the end unless the final chunk (AAD ``"final"``) carried
   the end piece: a truncated answer is never passed off as complete.

:class:`Client` runs on urllib3 (blocking, with a deadline on every read); :class:`AsyncClient` on
aiohttp, for the OpenAI-compatible proxy. Both share the pure core below. Every failure is a
:class:`~consumer.errors.ConsumerError`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Protocol, Self, overload
from urllib.parse import urlsplit

import aiohttp
import urllib3

from attestation import ExpectedMeasurements, Nonce, TrustRoot
from attestation.document import MAX_DOCUMENT_SIZE
from consumer.attest import (
    DEFAULT_MAX_AGE,
    Attestation,
    Expectation,
    RootSource,
    load_measurements,
    load_roots,
    verify_attestation,
)
from consumer.errors import (
    AttestationFailed,
    ConfigError,
    InvalidRequest,
    ResponseInvalid,
    ServerBusy,
    ServerError,
    ServerUnavailable,
    StaleKey,
    TransportError,
)
from protocol.errors import OhttpError
from protocol.inference import (
    INFER_PATH,
    MAX_IMAGE_BYTES,
    MAX_SMALL_BODY,
    FinishReason,
    Image,
    InferenceRequest,
    Params,
    StreamEnd,
    Usage,
    decode_stream_piece,
    http_request,
    parse_http_response,
)
from protocol.ohttp import (
    MEDIA_TYPE_CHUNKED_REQUEST,
    MEDIA_TYPE_CHUNKED_RESPONSE,
    MEDIA_TYPE_REQUEST,
    MEDIA_TYPE_RESPONSE,
    ChunkedResponseReader,
    ClientContext,
    encapsulate_chunked_request,
    encapsulate_request,
)

__all__ = [
    "ATTESTATION_PATH",
    "DEFAULT_TIMEOUT",
    "OHTTP_KEY_PROBLEM",
    "AsyncClient",
    "AsyncStream",
    "Client",
    "Completion",
    "ImageInput",
    "Stream",
    "build_request",
]

ATTESTATION_PATH: Final = "/v1/attestation"
OHTTP_KEY_PROBLEM: Final = "https://iana.org/assignments/http-problem-types#ohttp-key"
DEFAULT_TIMEOUT: Final = 60.0  # seconds: connecting, and each read (the gap between tokens)
_MAX_PROBLEM: Final = 64 * 1024  # an error answer's body
_MAX_SINGLE_RESPONSE: Final = MAX_SMALL_BODY + 64 * 1024  # body + BHTTP framing + nonce + tag
_MAX_STREAM: Final = 4 * 1024 * 1024  # a chunked response: text ≤ 1 MiB plus per-piece framing
_READ_SIZE: Final = 64 * 1024
_MAX_TIMEOUT: Final = 3600.0

ImageInput = Image | tuple[str, bytes] | str | os.PathLike[str]
"""An image: an :class:`~protocol.inference.Image`, ``(media_type, bytes)``, or a file's path
(PNG or JPEG, recognised by its signature)."""


@dataclass(frozen=True)
class Completion:
    """A whole, authenticated completion and the attestation of the enclave that wrote it."""

    text: str
    finish_reason: FinishReason
    usage: Usage
    attestation: Attestation


def _utc_now() -> datetime:
    return datetime.now(UTC)


# --- The pure core (no I/O) ----------------------------------------------------------------------


def _base_url(url: str) -> str:
    if not isinstance(url, str):
        raise ConfigError("url must be text, e.g. http://127.0.0.1:8443")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("url must be http(s)://HOST[:PORT][/PREFIX]")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError("url must not carry a query, a fragment or credentials")
    try:
        parts.port  # noqa: B018  (raises for a bad port)
    except ValueError:
        raise ConfigError("url has an invalid port") from None
    return url.rstrip("/")


def _check_timeout(timeout: float) -> float:
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or not 0 < timeout <= _MAX_TIMEOUT
    ):
        raise ConfigError(f"timeout must be a number of seconds in (0, {_MAX_TIMEOUT:.0f}]")
    return float(timeout)


def _check_max_age(max_age: timedelta) -> timedelta:
    if not isinstance(max_age, timedelta) or max_age <= timedelta(0):
        raise ConfigError("max_age must be a positive timedelta")
    return max_age


def _load_image(item: ImageInput, index: int) -> Image:
    try:
        if isinstance(item, Image):
            return item
        if isinstance(item, tuple):
            if len(item) != 2:
                raise InvalidRequest(f"images[{index}] must be (media_type, bytes)")
            media_type, data = item
            return Image(media_type, bytes(data))  # type: ignore[arg-type]  # Image checks it
        if isinstance(item, str | os.PathLike):
            return _image_file(Path(item), index)
    except OhttpError as exc:
        raise InvalidRequest(f"images[{index}]: {exc}") from None
    raise InvalidRequest(f"images[{index}] must be a path, (media_type, bytes) or an Image")


def _image_file(path: Path, index: int) -> Image:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_IMAGE_BYTES + 1)
    except OSError as exc:
        raise InvalidRequest(f"images[{index}]: cannot read {path}: {exc.strerror}") from None
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return Image("image/png", data)
    if data.startswith(b"\xff\xd8\xff"):
        return Image("image/jpeg", data)
    raise InvalidRequest(f"images[{index}]: {path} is neither a PNG nor a JPEG file")


def build_request(
    prompt: str,
    *,
    images: Sequence[ImageInput] = (),
    max_tokens: int = Params.max_tokens,
    temperature: float = Params.temperature,
    top_p: float = Params.top_p,
    stop: str | Sequence[str] = (),
    stream: bool = False,
) -> InferenceRequest:
    """Validate the caller's input into an :class:`InferenceRequest`; raises
    :class:`InvalidRequest` (naming the field, never quoting it)."""
    if isinstance(images, str | bytes | os.PathLike | Image) or not isinstance(images, Sequence):
        raise InvalidRequest("images must be a list")
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    try:
        return InferenceRequest(
            prompt=prompt,
            images=tuple(_load_image(item, i) for i, item in enumerate(images)),
            params=Params(
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                stop=stops,
                stream=stream,
            ),
        )
    except OhttpError as exc:
        raise InvalidRequest(str(exc)) from None


@dataclass
class _Exchange:
    """One request encapsulated to one attested key, and the context that alone opens its answer."""

    attestation: Attestation
    content_type: str
    response_type: str
    body: bytes
    context: ClientContext

    @classmethod
    def prepare(cls, attestation: Attestation, request: InferenceRequest) -> _Exchange:
        message = http_request(request)
        try:
            if request.params.stream:
                writer, context = encapsulate_chunked_request(attestation.key_config)
                body = writer.final(message)
                return cls(
                    attestation,
                    MEDIA_TYPE_CHUNKED_REQUEST,
                    MEDIA_TYPE_CHUNKED_RESPONSE,
                    body,
                    context,
                )
            body, context = encapsulate_request(attestation.key_config, message)
        except OhttpError as exc:  # the attested configuration was checked; this is a size cap
            raise InvalidRequest(str(exc)) from None
        return cls(attestation, MEDIA_TYPE_REQUEST, MEDIA_TYPE_RESPONSE, body, context)

    def check_content_type(self, content_type: str | None) -> None:
        base = (content_type or "").split(";", 1)[0].strip().lower()
        if base != self.response_type:
            raise ResponseInvalid(f"the response's content type is not {self.response_type}")

    def open(self, data: bytes) -> Completion:
        """The whole answer to a plain request; ``data`` is untrusted (it crossed the parent)."""
        try:
            response = parse_http_response(self.context.decapsulate_response(data))
        except OhttpError as exc:
            raise ResponseInvalid(f"the response is refused: {exc}") from None
        return Completion(response.text, response.finish_reason, response.usage, self.attestation)

    def piece_reader(self) -> _PieceReader:
        return _PieceReader(self.context.chunked_response_reader(max_size=_MAX_STREAM))


class _PieceReader:
    """The pieces of a chunked response: deltas in non-final chunks, the end in the final one."""

    def __init__(self, reader: ChunkedResponseReader) -> None:
        self._reader = reader

    def feed(self, data: bytes) -> list[str]:
        """Texts of the chunks ``data`` completes (``data`` is untrusted)."""
        try:
            plaintexts = self._reader.feed(data)
            pieces = [decode_stream_piece(p) for p in plaintexts]
        except OhttpError as exc:
            raise ResponseInvalid(f"the response stream is refused: {exc}") from None
        out = []
        for piece in pieces:
            if isinstance(piece, StreamEnd):
                raise ResponseInvalid("the end piece arrived in a non-final chunk")
            if piece.text:
                out.append(piece.text)
        return out

    def close(self) -> StreamEnd:
        """The stream ended: its final chunk must authenticate and carry the end piece."""
        try:
            piece = decode_stream_piece(self._reader.close())
        except OhttpError as exc:
            raise ResponseInvalid(f"the response stream is refused: {exc}") from None
        if not isinstance(piece, StreamEnd):
            raise ResponseInvalid("the final chunk does not carry the end piece")
        return piece


class _Headers(Protocol):
    def get(self, key: str, /) -> str | None: ...


def _status_error(status: int, headers: _Headers, body: bytes) -> ServerError:
    """The typed error for a non-200 answer. Everything in it comes from the untrusted parent."""
    problem: dict[str, object] = {}
    content_type = (headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
    if content_type in ("application/problem+json", "application/json"):
        try:
            value = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            value = None
        if isinstance(value, dict):
            for key in ("type", "title", "status", "detail", "code"):
                item = value.get(key)
                if isinstance(item, str):
                    problem[key] = item[:500]
                elif isinstance(item, int) and not isinstance(item, bool):
                    problem[key] = item
    retry_after = _retry_after(headers.get("Retry-After"))
    said = problem.get("title") or problem.get("detail") or problem.get("code")
    suffix = f": {_printable(str(said))[:200]}" if said else ""
    message = f"the bridge answered {status}{suffix}"
    if status == 422 and problem.get("type") == OHTTP_KEY_PROBLEM:
        return StaleKey(
            f"{message} (the enclave's OHTTP key changed)", status=status, problem=problem
        )
    kind = {429: ServerBusy, 503: ServerUnavailable}.get(status, ServerError)
    return kind(message, status=status, problem=problem, retry_after=retry_after)


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None  # an HTTP date: not worth trusting the parent's clock for
    return seconds if math.isfinite(seconds) and 0 <= seconds <= 86400 else None


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


class _ClientCore:
    """What both clients share: configuration, the attestation cache, retries on a stale key."""

    def __init__(
        self,
        url: str,
        *,
        expect: Expectation,
        max_age: timedelta,
        roots: Sequence[TrustRoot] | None,
        trust_local_root: RootSource | None,
        timeout: float,
        clock: Callable[[], datetime],
    ) -> None:
        self.url = _base_url(url)
        self.measurements: ExpectedMeasurements = load_measurements(expect)
        self.roots = load_roots(roots, trust_local_root)
        self.max_age = _check_max_age(max_age)
        self.timeout = _check_timeout(timeout)
        self._clock = clock
        self._by_key_id: dict[int, Attestation] = {}
        self._current: Attestation | None = None
        self._cache_lock = threading.Lock()

    def _attestation_url(self, nonce: Nonce) -> str:
        return f"{self.url}{ATTESTATION_PATH}?nonce={nonce.hex()}"

    @property
    def _infer_url(self) -> str:
        return f"{self.url}{INFER_PATH}"

    def _accept(self, raw: bytes, nonce: Nonce) -> Attestation:
        attestation = verify_attestation(
            raw,
            nonce=nonce,
            measurements=self.measurements,
            roots=self.roots,
            now=self._clock(),
            max_age=self.max_age,
        )
        with self._cache_lock:
            self._by_key_id[attestation.key_id] = attestation
            self._current = attestation
        return attestation

    def _cached(self) -> Attestation | None:
        with self._cache_lock:
            current = self._current
        if current is not None and not current.expired(self._clock()):
            return current
        return None

    def _forget(self, attestation: Attestation) -> None:
        with self._cache_lock:
            if self._by_key_id.get(attestation.key_id) is attestation:
                del self._by_key_id[attestation.key_id]
            if self._current is attestation:
                self._current = None

    def cached_attestation(self, key_id: int) -> Attestation | None:
        """The verified attestation cached for ``key_id``, if any."""
        with self._cache_lock:
            return self._by_key_id.get(key_id)


def _too_large_document() -> AttestationFailed:
    return AttestationFailed(
        f"the attestation document is larger than {MAX_DOCUMENT_SIZE} bytes",
        reason="MalformedDocument",
    )


# --- The blocking client (urllib3) ---------------------------------------------------------------


class Client(_ClientCore):
    """A blocking client for one bridge URL. Thread-safe; close it (or use ``with``).

    ``expect`` is required: expected measurements, a PCR set, or an ``--expect`` file's path.
    ``roots`` defaults to the pinned AWS Nitro root G1; ``trust_local_root`` (a PEM or its path)
    adds an emulator's root, and only when named. ``timeout`` bounds connecting and every read.
    """

    def __init__(
        self,
        url: str,
        *,
        expect: Expectation,
        max_age: timedelta = DEFAULT_MAX_AGE,
        roots: Sequence[TrustRoot] | None = None,
        trust_local_root: RootSource | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        super().__init__(
            url,
            expect=expect,
            max_age=max_age,
            roots=roots,
            trust_local_root=trust_local_root,
            timeout=timeout,
            clock=clock,
        )
        self._pool = urllib3.PoolManager(
            retries=False,
            timeout=urllib3.Timeout(connect=self.timeout, read=self.timeout),
            headers={"Accept-Encoding": "identity", "User-Agent": "nci-consumer"},
        )

    def close(self) -> None:
        self._pool.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def attest(self) -> Attestation:
        """Attest now with a fresh nonce, verify, and cache the result by its key id."""
        nonce = Nonce.random()
        response = self._open("GET", self._attestation_url(nonce))
        try:
            if response.status != 200:
                raise _status_error(response.status, response.headers, _read_problem(response))
            raw = _read(response, MAX_DOCUMENT_SIZE, too_large=_too_large_document)
        except BaseException:
            _discard(response)
            raise
        response.release_conn()
        return self._accept(raw, nonce)

    def attestation(self) -> Attestation:
        """The cached attestation while it is younger than ``max_age``; else a fresh one."""
        return self._cached() or self.attest()

    @overload
    def generate(
        self,
        prompt: str,
        *,
        images: Sequence[ImageInput] = ...,
        max_tokens: int = ...,
        temperature: float = ...,
        top_p: float = ...,
        stop: str | Sequence[str] = ...,
        stream: Literal[False] = False,
    ) -> Completion: ...

    @overload
    def generate(
        self,
        prompt: str,
        *,
        images: Sequence[ImageInput] = ...,
        max_tokens: int = ...,
        temperature: float = ...,
        top_p: float = ...,
        stop: str | Sequence[str] = ...,
        stream: Literal[True],
    ) -> Stream: ...

    def generate(
        self,
        prompt: str,
        *,
        images: Sequence[ImageInput] = (),
        max_tokens: int = Params.max_tokens,
        temperature: float = Params.temperature,
        top_p: float = Params.top_p,
        stop: str | Sequence[str] = (),
        stream: bool = False,
    ) -> Completion | Stream:
        """Ask the attested enclave. Without ``stream`` the whole :class:`Completion`; with it a
        :class:`Stream` of text pieces, returned once the enclave accepted the request."""
        request = build_request(
            prompt,
            images=images,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            stream=stream,
        )
        attestation = self.attestation()
        try:
            return self._send(attestation, request)
        except StaleKey:
            # RFC 9458 §5.3: the key changed; attest again (fresh nonce), retry exactly once
            self._forget(attestation)
            return self._send(self.attest(), request)

    def _send(self, attestation: Attestation, request: InferenceRequest) -> Completion | Stream:
        exchange = _Exchange.prepare(attestation, request)
        response = self._open(
            "POST",
            self._infer_url,
            body=exchange.body,
            headers={"Content-Type": exchange.content_type, "Accept": exchange.response_type},
        )
        try:
            if response.status != 200:
                raise _status_error(response.status, response.headers, _read_problem(response))
            exchange.check_content_type(response.headers.get("Content-Type"))
            if request.params.stream:
                return Stream(response, exchange)
            data = _read(response, _MAX_SINGLE_RESPONSE, mid_body=True)
        except BaseException:
            _discard(response)
            raise
        response.release_conn()
        return exchange.open(data)

    def _open(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> urllib3.BaseHTTPResponse:
        try:
            return self._pool.request(
                method,
                url,
                body=body,
                headers={**self._pool.headers, **(headers or {})},
                preload_content=False,
                decode_content=False,  # ciphertext: never decompress
                redirect=False,
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise TransportError(f"cannot reach {self.url}: {type(exc).__name__}") from None


def _read(
    response: urllib3.BaseHTTPResponse,
    limit: int,
    *,
    mid_body: bool = False,
    too_large: Callable[[], Exception] | None = None,
) -> bytes:
    """The body, at most ``limit`` bytes (more is refused)."""
    parts: list[bytes] = []
    total = 0
    while True:
        data = _read1(response, mid_body=mid_body)
        if not data:
            return b"".join(parts)
        total += len(data)
        if total > limit:
            if too_large is not None:
                raise too_large()
            raise ResponseInvalid(f"the response is larger than {limit} bytes")
        parts.append(data)


def _read_problem(response: urllib3.BaseHTTPResponse) -> bytes:
    """The start of an error answer's body (the rest is dropped with the connection)."""
    data = b""
    while len(data) <= _MAX_PROBLEM:
        part = _read1(response, mid_body=False)
        if not part:
            break
        data += part
    return data[:_MAX_PROBLEM]


def _discard(response: urllib3.BaseHTTPResponse) -> None:
    """Drop a connection whose response was not read to its end: it must not be reused."""
    response.close()
    response.release_conn()


def _read1(response: urllib3.BaseHTTPResponse, *, mid_body: bool) -> bytes:
    try:
        return response.read1(_READ_SIZE)
    except urllib3.exceptions.TimeoutError:
        raise TransportError("no data from the bridge within the timeout") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        if mid_body:
            raise ResponseInvalid(
                f"the response broke off before it was complete ({type(exc).__name__})"
            ) from None
        raise TransportError(f"reading from the bridge failed: {type(exc).__name__}") from None


class Stream:
    """The text pieces of a streamed completion, each yielded as its chunk authenticates.

    Iteration ends only after the final chunk authenticated and carried the end piece; then
    :attr:`finish_reason` and :attr:`usage` are set. A stream cut short or altered raises
    :class:`~consumer.errors.ResponseInvalid` instead of ending. Close it (or use ``with``) to
    drop the connection early.
    """

    def __init__(self, response: urllib3.BaseHTTPResponse, exchange: _Exchange) -> None:
        self._response = response
        self._reader = exchange.piece_reader()
        self.attestation = exchange.attestation
        self.finish_reason: FinishReason | None = None
        self.usage: Usage | None = None
        self._pending: deque[str] = deque()
        self._text: list[str] = []
        self._done = False

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        while not self._pending:
            if self._done:
                raise StopIteration
            try:
                data = _read1(self._response, mid_body=True)
                if data:
                    self._pending.extend(self._reader.feed(data))
                else:
                    end = self._reader.close()
                    self.finish_reason, self.usage = end.finish_reason, end.usage
                    self._done = True
                    self._response.release_conn()
            except BaseException:
                self._done = True
                self._drop()
                raise
        piece = self._pending.popleft()
        self._text.append(piece)
        return piece

    def completion(self) -> Completion:
        """Read the rest and return the whole completion (raises if it is not complete)."""
        for _ in self:
            pass
        if self.finish_reason is None or self.usage is None:
            raise ResponseInvalid("the stream was closed before its end")
        return Completion("".join(self._text), self.finish_reason, self.usage, self.attestation)

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._drop()

    def _drop(self) -> None:
        _discard(self._response)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --- The asynchronous client (aiohttp) -----------------------------------------------------------


class AsyncClient(_ClientCore):
    """The asynchronous twin of :class:`Client` (same arguments), on aiohttp.

    Concurrent requests share one attestation: only one attests at a time. Close it with
    :meth:`aclose` (or ``async with``).
    """

    def __init__(
        self,
        url: str,
        *,
        expect: Expectation,
        max_age: timedelta = DEFAULT_MAX_AGE,
        roots: Sequence[TrustRoot] | None = None,
        trust_local_root: RootSource | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        super().__init__(
            url,
            expect=expect,
            max_age=max_age,
            roots=roots,
            trust_local_root=trust_local_root,
            timeout=timeout,
            clock=clock,
        )
        self._session: aiohttp.ClientSession | None = None
        self._attest_lock: asyncio.Lock | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self.timeout, sock_read=self.timeout
                ),
                auto_decompress=False,  # ciphertext: never decompress
                headers={"Accept-Encoding": "identity", "User-Agent": "nci-consumer"},
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def attest(self) -> Attestation:
        """Attest now with a fresh nonce, verify, and cache the result by its key id."""
        nonce = Nonce.random()
        response = await self._open("GET", self._attestation_url(nonce))
        async with response:
            if response.status != 200:
                body = await _aread_problem(response)
                raise _status_error(response.status, response.headers, body)
            raw = await _aread(response, MAX_DOCUMENT_SIZE, too_large=_too_large_document)
        return self._accept(raw, nonce)

    async def attestation(self) -> Attestation:
        """The cached attestation while it is younger than ``max_age``; else a fresh one."""
        cached = self._cached()
        if cached is not None:
            return cached
        if self._attest_lock is None:
            self._attest_lock = asyncio.Lock()
        async with self._attest_lock:
            return self._cached() or await self.attest()

    @overload
    async def generate(
        self,
        prompt: str,
        *,
        images: Sequence[ImageInput] = ...,
        max_tokens: int = ...,
        temperature: float = ...,
        top_p: float = ...,
        stop: str | Sequence[str] = ...,
        stream: Literal[False] = False,
    ) -> Completion: ...

    @overload
    async def generate(
        self,
        prompt: str,
        *,
        images: Sequence[ImageInput] = ...,
        max_tokens: int = ...,
        temperature: float = ...,
        top_p: float = ...,
        stop: str | Sequence[str] = ...,
        stream: Literal[True],
    ) -> AsyncStream: ...

    async def generate(
        self,
        prompt: str,
        *,
        images: Sequence[ImageInput] = (),
        max_tokens: int = Params.max_tokens,
        temperature: float = Params.temperature,
        top_p: float = Params.top_p,
        stop: str | Sequence[str] = (),
        stream: bool = False,
    ) -> Completion | AsyncStream:
        """As :meth:`Client.generate`; a stream is an :class:`AsyncStream`."""
        request = build_request(
            prompt,
            images=images,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            stream=stream,
        )
        return await self.send(request)

    async def send(self, request: InferenceRequest) -> Completion | AsyncStream:
        """Send a built request (see :func:`build_request`), re-attesting once on a stale key."""
        attestation = await self.attestation()
        try:
            return await self._send(attestation, request)
        except StaleKey:
            self._forget(attestation)
            if self._attest_lock is None:
                self._attest_lock = asyncio.Lock()
            async with self._attest_lock:
                fresh = self._cached()
                if fresh is None or fresh is attestation:
                    fresh = await self.attest()
            return await self._send(fresh, request)

    async def _send(
        self, attestation: Attestation, request: InferenceRequest
    ) -> Completion | AsyncStream:
        exchange = _Exchange.prepare(attestation, request)
        response = await self._open(
            "POST",
            self._infer_url,
            data=exchange.body,
            headers={"Content-Type": exchange.content_type, "Accept": exchange.response_type},
        )
        try:
            if response.status != 200:
                body = await _aread_problem(response)
                raise _status_error(response.status, response.headers, body)
            exchange.check_content_type(response.headers.get("Content-Type"))
            if request.params.stream:
                return AsyncStream(response, exchange)
            data = await _aread(response, _MAX_SINGLE_RESPONSE, mid_body=True)
        except BaseException:
            response.close()
            raise
        response.release()
        return exchange.open(data)

    async def _open(
        self,
        method: str,
        url: str,
        *,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        try:
            return await self._http().request(
                method, url, data=data, headers=headers, allow_redirects=False
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransportError(f"cannot reach {self.url}: {type(exc).__name__}") from None


async def _aread(
    response: aiohttp.ClientResponse,
    limit: int,
    *,
    mid_body: bool = False,
    too_large: Callable[[], Exception] | None = None,
) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        data = await _areadany(response, mid_body=mid_body)
        if not data:
            return b"".join(parts)
        total += len(data)
        if total > limit:
            if too_large is not None:
                raise too_large()
            raise ResponseInvalid(f"the response is larger than {limit} bytes")
        parts.append(data)


async def _aread_problem(response: aiohttp.ClientResponse) -> bytes:
    data = b""
    while len(data) <= _MAX_PROBLEM:
        part = await _areadany(response, mid_body=False)
        if not part:
            break
        data += part
    return data[:_MAX_PROBLEM]


async def _areadany(response: aiohttp.ClientResponse, *, mid_body: bool) -> bytes:
    try:
        return await response.content.readany()
    except (TimeoutError, aiohttp.ServerTimeoutError):
        raise TransportError("no data from the bridge within the timeout") from None
    except (aiohttp.ClientError, OSError) as exc:
        if mid_body:
            raise ResponseInvalid(
                f"the response broke off before it was complete ({type(exc).__name__})"
            ) from None
        raise TransportError(f"reading from the bridge failed: {type(exc).__name__}") from None


class AsyncStream:
    """The asynchronous twin of :class:`Stream`: ``async for piece in stream``."""

    def __init__(self, response: aiohttp.ClientResponse, exchange: _Exchange) -> None:
        self._response = response
        self._reader = exchange.piece_reader()
        self.attestation = exchange.attestation
        self.finish_reason: FinishReason | None = None
        self.usage: Usage | None = None
        self._pending: deque[str] = deque()
        self._text: list[str] = []
        self._done = False

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        while not self._pending:
            if self._done:
                raise StopAsyncIteration
            try:
                data = await _areadany(self._response, mid_body=True)
                if data:
                    self._pending.extend(self._reader.feed(data))
                else:
                    end = self._reader.close()
                    self.finish_reason, self.usage = end.finish_reason, end.usage
                    self._done = True
                    self._response.release()
            except BaseException:
                self._done = True
                self._response.close()
                raise
        piece = self._pending.popleft()
        self._text.append(piece)
        return piece

    async def completion(self) -> Completion:
        """Read the rest and return the whole completion (raises if it is not complete)."""
        async for _ in self:
            pass
        if self.finish_reason is None or self.usage is None:
            raise ResponseInvalid("the stream was closed before its end")
        return Completion("".join(self._text), self.finish_reason, self.usage, self.attestation)

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._response.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
