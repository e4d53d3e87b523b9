"""The consumer's SDK: attest the enclave, encrypt the prompt to it, decrypt the completion.

::

    from consumer import Client
    with Client("http://127.0.0.1:8443", expect="expected-pcrs.yaml") as client:
        answer = client.generate("What shape is this?", images=["shape.png"])
        for piece in client.generate("Describe it.", images=["shape.png"], stream=True):
            print(piece, end="", flush=True)

:class:`Client` runs on urllib3 (blocking, with a deadline on every read); :class:`AsyncClient`
(``consumer._async``) on aiohttp, for the OpenAI-compatible proxy. Both are thin transports
around the I/O-free core in ``consumer._core``, which documents the steps of a request: attest
(or use a cached attestation), pad and encapsulate the request to the attested key, post it,
re-attest and retry once when the enclave's key changed, and open the answer with this request's
context alone. Every failure is a :class:`~consumer.errors.ConsumerError`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Literal, Self, overload

import urllib3

from attestation import Nonce, TrustRoot
from attestation.document import MAX_DOCUMENT_SIZE
from consumer._async import AsyncClient, AsyncStream
from consumer._core import (
    ATTESTATION_PATH,
    DEFAULT_TIMEOUT,
    MAX_PROBLEM,
    MAX_SINGLE_RESPONSE,
    OHTTP_KEY_PROBLEM,
    READ_SIZE,
    ClientCore,
    Completion,
    Exchange,
    ImageInput,
    build_request,
    retry_with_fresh_key,
    status_error,
    too_large_document,
    utc_now,
)
from consumer.attest import DEFAULT_MAX_AGE, Attestation, Expectation, RootSource
from consumer.errors import ResponseInvalid, ServerError, TransportError
from protocol.inference import FinishReason, InferenceRequest, Params, Usage

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


class Client(ClientCore):
    """A blocking client for one bridge URL. Thread-safe; close it (or use ``with``).

    ``expect`` is required: expected measurements, a PCR set, or an ``--expect`` file's path; every
    accepted set must pin the image (PCR0, or PCR8 for a signed image). ``expect_model_id`` and
    ``expect_manifest_sha256`` (32 bytes or 64 hex digits), when given, must equal the model and
    bundle the enclave attests to. ``roots`` defaults to the pinned AWS Nitro root G1;
    ``trust_local_root`` (a PEM or its path) adds an emulator's root, and only when named.
    ``timeout`` bounds connecting and every read.
    """

    def __init__(
        self,
        url: str,
        *,
        expect: Expectation,
        expect_model_id: str | None = None,
        expect_manifest_sha256: bytes | str | None = None,
        max_age: timedelta = DEFAULT_MAX_AGE,
        roots: Sequence[TrustRoot] | None = None,
        trust_local_root: RootSource | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        super().__init__(
            url,
            expect=expect,
            expect_model_id=expect_model_id,
            expect_manifest_sha256=expect_manifest_sha256,
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
                raise status_error(response.status, response.headers, _read_problem(response))
            raw = _read(response, MAX_DOCUMENT_SIZE, too_large=too_large_document)
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
        return self.send(request)

    def send(self, request: InferenceRequest) -> Completion | Stream:
        """Send a built request (see :func:`build_request`), attesting again and retrying once
        when the enclave's key changed (``consumer._core.retry_with_fresh_key``)."""
        attestation = self._cached()
        cached = attestation is not None
        if attestation is None:
            attestation = self.attest()
        try:
            return self._send(attestation, request)
        except ServerError as exc:
            if not retry_with_fresh_key(exc, cached=cached):
                raise
            # the key changed: attest again (fresh nonce), retry exactly once
            self._forget(attestation)
            return self._send(self.attest(), request)

    def _send(self, attestation: Attestation, request: InferenceRequest) -> Completion | Stream:
        exchange = Exchange.prepare(attestation, request)
        response = self._open(
            "POST",
            self._infer_url,
            body=exchange.body,
            headers={"Content-Type": exchange.content_type, "Accept": exchange.response_type},
        )
        try:
            if response.status != 200:
                raise status_error(response.status, response.headers, _read_problem(response))
            exchange.check_content_type(response.headers.get("Content-Type"))
            if request.params.stream:
                return Stream(response, exchange)
            data = _read(response, MAX_SINGLE_RESPONSE, mid_body=True)
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
    while len(data) <= MAX_PROBLEM:
        part = _read1(response, mid_body=False)
        if not part:
            break
        data += part
    return data[:MAX_PROBLEM]


def _discard(response: urllib3.BaseHTTPResponse) -> None:
    """Drop a connection whose response was not read to its end: it must not be reused."""
    response.close()
    response.release_conn()


def _read1(response: urllib3.BaseHTTPResponse, *, mid_body: bool) -> bytes:
    try:
        return response.read1(READ_SIZE)
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

    def __init__(self, response: urllib3.BaseHTTPResponse, exchange: Exchange) -> None:
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
                _discard(self._response)
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
            _discard(self._response)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
