"""The asynchronous client, on aiohttp: the transport of :class:`AsyncClient` and
:class:`AsyncStream` around the shared core (``consumer._core``). Public through
``consumer.client`` and ``consumer``."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Literal, Self, overload

import aiohttp

from attestation import Nonce, TrustRoot
from attestation.document import MAX_DOCUMENT_SIZE
from consumer._core import (
    DEFAULT_TIMEOUT,
    MAX_PROBLEM,
    MAX_SINGLE_RESPONSE,
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

__all__ = ["AsyncClient", "AsyncStream"]


class AsyncClient(ClientCore):
    """The asynchronous twin of :class:`~consumer.client.Client` (same arguments), on aiohttp.

    Concurrent requests share one attestation: only one attests at a time. Close it with
    :meth:`aclose` (or ``async with``).
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

    def _lock(self) -> asyncio.Lock:
        if self._attest_lock is None:
            self._attest_lock = asyncio.Lock()
        return self._attest_lock

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
                raise status_error(response.status, response.headers, body)
            raw = await _aread(response, MAX_DOCUMENT_SIZE, too_large=too_large_document)
        return self._accept(raw, nonce)

    async def attestation(self) -> Attestation:
        """The cached attestation while it is younger than ``max_age``; else a fresh one."""
        attestation, _ = await self._attestation_for_request()
        return attestation

    async def _attestation_for_request(self) -> tuple[Attestation, bool]:
        """An attestation and whether it was cached (rather than made by this call)."""
        cached = self._cached()
        if cached is not None:
            return cached, True
        async with self._lock():
            cached = self._cached()  # another request attested while this one waited
            if cached is not None:
                return cached, True
            return await self.attest(), False

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
        """Send a built request (see :func:`build_request`), attesting again and retrying once
        when the enclave's key changed (``consumer._core.retry_with_fresh_key``)."""
        attestation, cached = await self._attestation_for_request()
        try:
            return await self._send(attestation, request)
        except ServerError as exc:
            if not retry_with_fresh_key(exc, cached=cached):
                raise
            self._forget(attestation)
            async with self._lock():
                fresh = self._cached()  # a concurrent request may have attested again already
                if fresh is None or fresh is attestation:
                    fresh = await self.attest()
            return await self._send(fresh, request)

    async def _send(
        self, attestation: Attestation, request: InferenceRequest
    ) -> Completion | AsyncStream:
        exchange = Exchange.prepare(attestation, request)
        response = await self._open(
            "POST",
            self._infer_url,
            data=exchange.body,
            headers={"Content-Type": exchange.content_type, "Accept": exchange.response_type},
        )
        try:
            if response.status != 200:
                body = await _aread_problem(response)
                raise status_error(response.status, response.headers, body)
            exchange.check_content_type(response.headers.get("Content-Type"))
            if request.params.stream:
                return AsyncStream(response, exchange)
            data = await _aread(response, MAX_SINGLE_RESPONSE, mid_body=True)
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
    """The body, at most ``limit`` bytes (more is refused)."""
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
    """The start of an error answer's body (the rest is dropped with the connection)."""
    data = b""
    while len(data) <= MAX_PROBLEM:
        part = await _areadany(response, mid_body=False)
        if not part:
            break
        data += part
    return data[:MAX_PROBLEM]


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
    """The asynchronous twin of :class:`~consumer.client.Stream`: ``async for piece in stream``."""

    def __init__(self, response: aiohttp.ClientResponse, exchange: Exchange) -> None:
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
