"""The consumer-facing HTTP bridge (docs/request-path.md, "HTTP API of the bridge").

Runs on the untrusted parent and moves ciphertext only: it never parses, logs or keeps a request
or response body. Everything it reads from a consumer is untrusted input from the internet.

==========================================  ==================================================
request                                     answer
==========================================  ==================================================
``GET /v1/attestation?nonce=HEX``           200 ``application/cbor``: the document, verbatim
``POST /v1/infer`` (``message/ohttp-req``   200 ``message/ohttp-res`` /
or ``message/ohttp-chunked-req``)           ``message/ohttp-chunked-res``, streamed as it comes
``GET /healthz``                            200 / 503 JSON: the enclave's boot state
``GET /metrics``                            Prometheus text: counts, sizes, latencies, states
==========================================  ==================================================

Errors are ``application/problem+json`` (RFC 9457) with the status the contract gives the
enclave's error code; ``unknown_key`` gets RFC 9458 §5.3's problem type so clients re-attest. A
failure after response bytes went out cannot become an error status: the bridge aborts the
connection without the final chunk, and the consumer fails closed.

Limits, all in :class:`BridgeLimits`: the body cap (413 from ``Content-Length`` before reading, and
counted while reading), concurrent inference requests, request bodies being received and
attestation requests (each its own budget; over it, 429 with ``Retry-After`` instead of a queue), a
deadline on every read from the consumer and on the whole body (slowloris: headers through the
server's keep-alive timeout, the body per read and in total, 408), a deadline on the whole request,
and backpressure (every write to the consumer waits for the transport to drain, within a deadline).

An inference request holds an inference slot only from its complete body to the end of its
response: a consumer that uploads slowly holds an upload slot for at most ``body_timeout`` seconds
and never keeps anyone from the enclave.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from parent._bridgemetrics import BridgeMetrics, Slots
from parent.enclave_link import EnclaveError, EnclaveLink
from parent.metrics import CONTENT_TYPE, Registry
from protocol.control import MAX_INFER_REQUEST, MAX_NONCE, MIN_NONCE, InferMode, InferRequest
from protocol.errors import ConfigError, FrameError, TransportError
from protocol.transport import Address

__all__ = ["BridgeLimits", "BridgeServer", "create_app", "start_bridge"]

logger = logging.getLogger(__name__)

OHTTP_KEY_PROBLEM: Final = "https://iana.org/assignments/http-problem-types#ohttp-key"
PROBLEM_JSON: Final = "application/problem+json"
_HEX_NONCE = re.compile(rf"(?:[0-9a-fA-F]{{2}}){{{MIN_NONCE},{MAX_NONCE}}}", re.ASCII)
_ROUTES: Final = ("attestation", "infer", "healthz", "metrics")
_PREPARED: Final = web.RequestKey("nci_prepared", web.StreamResponse)  # a response that started

# enclave (or link) error code → (HTTP status, title, whether to send Retry-After)
_STATUS: Final[dict[str, tuple[int, str, bool]]] = {
    "unknown_key": (422, "The request's OHTTP key is not the enclave's current key", False),
    "malformed": (400, "The encapsulated request is malformed", False),
    "not_ready": (503, "The enclave is not ready", True),
    "busy": (429, "Too many requests in progress", True),
    "too_large": (413, "The request is too large", False),
    "internal": (500, "The enclave failed", False),
    "unreachable": (503, "The enclave is unreachable", True),
    "timeout": (504, "The enclave did not answer in time", False),
    "overflow": (500, "The response was not read fast enough", False),
}


@dataclass(frozen=True)
class BridgeLimits:
    """Limits of the bridge; every one fails closed.

    Request bodies in memory are bounded by ``(upload_limit + max_concurrency) × max_body_bytes``
    (with the defaults, 24 × 16 MiB), whatever consumers do.
    """

    max_body_bytes: int = MAX_INFER_REQUEST  # encapsulated request cap (413)
    max_concurrency: int = 8  # inference requests at once (body complete, enclave working); 429
    max_uploads: int | None = None  # bodies being received at once (None: 2 × the above); 429
    max_attestations: int = 4  # attestation requests at once; more get 429
    client_read_timeout: float = 30.0  # each read from the consumer (headers, body pieces)
    body_timeout: float = 30.0  # the whole request body, from its first read to its last (408)
    request_deadline: float = 600.0  # the whole request, first byte of body to last of response
    write_timeout: float = 30.0  # each write to a consumer that stopped reading
    retry_after: int = 5  # Retry-After (seconds) for 503
    busy_retry_after: int = 1  # Retry-After (seconds) for 429
    linger: float = 1.0  # after refusing a body, discard (never keep) what still arrives this long

    def __post_init__(self) -> None:
        for name in (
            "max_body_bytes", "max_concurrency", "max_uploads", "max_attestations",
            "retry_after", "busy_retry_after",
        ):  # fmt: skip
            value = getattr(self, name)
            if (type(value) is not int or value < 1) and not (
                name == "max_uploads" and value is None
            ):
                raise ConfigError(f"limits.{name} must be a positive integer")
        if self.max_body_bytes > MAX_INFER_REQUEST:
            raise ConfigError(f"limits.max_body_bytes is at most {MAX_INFER_REQUEST}")
        for name in ("client_read_timeout", "body_timeout", "request_deadline", "write_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"limits.{name} must be a positive number of seconds")
        if isinstance(self.linger, bool) or not isinstance(self.linger, int | float):
            raise ConfigError("limits.linger must be a number of seconds")
        if not 0 <= self.linger <= 10:
            raise ConfigError("limits.linger must be 0..10 seconds")

    @property
    def upload_limit(self) -> int:
        """Request bodies received at once: ``max_uploads``, or twice ``max_concurrency``."""
        return self.max_uploads if self.max_uploads is not None else 2 * self.max_concurrency


class _Bridge:
    def __init__(self, link: EnclaveLink, limits: BridgeLimits, registry: Registry) -> None:
        self.link = link
        self.limits = limits
        self.registry = registry
        self.counters = BridgeMetrics(registry, link)
        self.inference = Slots(limits.max_concurrency, self.counters.in_flight)
        self.uploads = Slots(limits.upload_limit, self.counters.uploads)
        self.attestations = Slots(limits.max_attestations, self.counters.attestations)

    # -- middleware: metrics for every request (route names only, never paths or bodies) --------

    @web.middleware
    async def observe(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        route = request.match_info.route.name or "other"
        if route not in _ROUTES:
            route = "other"
        started = time.monotonic()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # the consumer left; its handler was cancelled (nginx's code for it)
            raise
        finally:
            self.counters.requests.inc(route=route, status=str(status))
            self.counters.latency.observe(time.monotonic() - started, route=route)

    # -- errors ----------------------------------------------------------------------------------

    def problem(
        self, code: str, detail: str = "", *, status: int | None = None, close: bool = False
    ) -> web.Response:
        """An ``application/problem+json`` answer for ``code`` (RFC 9457); ``detail`` names a
        rule, never content."""
        mapped, title, retry = _STATUS.get(code, _STATUS["internal"])
        status = status if status is not None else mapped
        body: dict[str, object] = {
            "type": OHTTP_KEY_PROBLEM if code == "unknown_key" else "about:blank",
            "title": title,
            "status": status,
            "code": code,
        }
        if detail:
            body["detail"] = detail
        headers = {"Cache-Control": "no-store"}
        if retry:
            seconds = self.limits.busy_retry_after if status == 429 else self.limits.retry_after
            headers["Retry-After"] = str(seconds)
        response = web.Response(
            status=status, text=json.dumps(body), content_type=PROBLEM_JSON, headers=headers
        )
        if close:
            response.force_close()
        return response

    # -- GET /v1/attestation ---------------------------------------------------------------------

    async def attestation(self, request: web.Request) -> web.StreamResponse:
        values = request.query.getall("nonce", [])
        if len(values) != 1 or not _HEX_NONCE.fullmatch(values[0]):
            return self.problem(
                "malformed",
                f"nonce must be one hex string of {MIN_NONCE}..{MAX_NONCE} bytes",
                status=400,
            )
        # the enclave's NSM is slow and shared: a flood waits in no queue here and cannot keep
        # the control connection's streams from inference
        if self.attestations.full():
            return self.problem("busy", "too many attestation requests in progress")
        try:
            with self.attestations.hold():
                document = await self.link.attest(bytes.fromhex(values[0]))
        except EnclaveError as exc:
            logger.info("attestation failed: %s", exc.code)
            return self.problem(exc.code, _detail(exc))
        except FrameError:  # unreachable: the nonce was checked above
            return self.problem("malformed", "bad nonce", status=400)
        self.counters.bytes_out.inc(len(document), route="attestation")
        return web.Response(
            body=document, content_type="application/cbor", headers={"Cache-Control": "no-store"}
        )

    # -- POST /v1/infer --------------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.StreamResponse:
        limits = self.limits
        # (1) admission before reading anything: media type, declared size, room to run it
        # (a body that could not run now is not worth receiving), room to receive it
        try:
            mode = InferMode.for_media_type(request.headers.get("Content-Type", ""))
        except FrameError as exc:
            return self.problem("malformed", str(exc), status=415, close=True)
        declared = request.content_length
        if declared is not None and declared > limits.max_body_bytes:
            return self.problem(
                "too_large", f"the body is capped at {limits.max_body_bytes} bytes", close=True
            )
        if self.inference.full():
            return self.problem("busy", "too many inference requests in progress", close=True)
        if self.uploads.full():
            return self.problem("busy", "too many request bodies being received", close=True)
        try:
            async with asyncio.timeout(limits.request_deadline):
                # (2) the body, under the upload budget, counted, with a deadline per read and
                # one for the whole body: a slow uploader holds no inference slot
                with self.uploads.hold():
                    body = await self._read_body(request)
                if isinstance(body, web.Response):
                    return body
                # (3) an inference slot, now that the body is complete (it was all read, so the
                # connection may stay open), then the enclave's answer
                if self.inference.full():
                    return self.problem("busy", "too many inference requests in progress")
                with self.inference.hold():
                    return await self._relay(request, mode, body)
        except TimeoutError:
            if _PREPARED not in request:
                return self.problem("timeout", "the request took too long", close=True)
            prepared = request[_PREPARED]
            self.counters.aborted.inc(reason="deadline")
            _abort(request)
            return prepared

    async def _read_body(self, request: web.Request) -> bytes | web.Response:
        """The request body (untrusted bytes from the internet, kept opaque), or the answer that
        refuses it: 413 over the cap, 408 when a read or the whole body is too slow."""
        cap = self.limits.max_body_bytes
        body = bytearray()
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                while True:
                    async with asyncio.timeout(self.limits.client_read_timeout):
                        piece = await request.content.readany()
                    if not piece:
                        break
                    if len(body) + len(piece) > cap:
                        self.counters.bytes_in.inc(len(body) + len(piece), route="infer")
                        return self.problem(
                            "too_large", f"the body is capped at {cap} bytes", close=True
                        )
                    body += piece
        except TimeoutError:
            self.counters.bytes_in.inc(len(body), route="infer")
            return self.problem(
                "malformed", "the request body did not arrive in time", status=408, close=True
            )
        self.counters.bytes_in.inc(len(body), route="infer")
        if not body:
            return self.problem("malformed", "the request body is empty")
        return bytes(body)

    async def _relay(
        self, request: web.Request, mode: InferMode, body: bytes
    ) -> web.StreamResponse:
        try:
            infer_request = InferRequest(mode, body)
        except FrameError as exc:
            return self.problem("malformed", str(exc))
        del body
        async with self.link.infer(infer_request) as stream:
            chunks = aiter(stream)
            try:
                first = await anext(chunks, None)
            except EnclaveError as exc:
                logger.info("inference refused: %s", exc.code)
                return self.problem(exc.code, _detail(exc))
            response = web.StreamResponse(
                status=200,
                headers={"Content-Type": mode.response_media_type, "Cache-Control": "no-store"},
            )
            response.enable_chunked_encoding()
            await response.prepare(request)
            request[_PREPARED] = response
            # (4) every chunk verbatim, in order; a failure now can only abort the connection
            try:
                chunk = first
                while chunk is not None:
                    await self._write(response, chunk)
                    chunk = await anext(chunks, None)
                await response.write_eof()
            except EnclaveError as exc:
                logger.warning("inference failed mid-stream: %s; aborting the response", exc.code)
                self.counters.aborted.inc(
                    reason="consumer" if exc.code == "overflow" else "enclave"
                )
                _abort(request)
            except (ConnectionError, TransportError):
                self.counters.aborted.inc(reason="consumer")
                _abort(request)
            return response

    async def _write(self, response: web.StreamResponse, chunk: bytes) -> None:
        try:
            async with asyncio.timeout(self.limits.write_timeout):
                await response.write(chunk)  # waits for the transport to drain (backpressure)
        except TimeoutError:
            raise TransportError("the consumer stopped reading") from None
        self.counters.bytes_out.inc(len(chunk), route="infer")

    # -- GET /healthz and /metrics ---------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        if not self.link.connected:
            return web.json_response({"status": "unreachable"}, status=503)
        try:
            health = await self.link.health()
        except EnclaveError as exc:
            return web.json_response({"status": "unreachable", "error": exc.code}, status=503)
        body = {
            "status": health.state,
            "step": health.step,
            "steps": health.steps,
            "name": health.name,
            "error": health.error,
            "key_id": health.key_id,
            "active": health.active,
            "served": health.served,
        }
        return web.json_response(body, status=200 if health.ready else 503)

    async def metrics_text(self, request: web.Request) -> web.StreamResponse:
        response = web.Response(text=self.registry.render())
        response.headers["Content-Type"] = CONTENT_TYPE
        return response


def _detail(exc: EnclaveError) -> str:
    return exc.message[:1024]


def _abort(request: web.Request) -> None:
    """End the connection without the response's final chunk: the consumer sees a truncated
    stream and fails closed (docs/request-path.md)."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def create_app(
    link: EnclaveLink, limits: BridgeLimits | None = None, *, registry: Registry | None = None
) -> web.Application:
    """The bridge's aiohttp application, answering for ``link``. ``registry`` receives the
    bridge's metrics (and renders every family registered on it at ``GET /metrics``)."""
    bridge = _Bridge(link, limits or BridgeLimits(), registry or Registry())
    app = web.Application(
        middlewares=[bridge.observe], client_max_size=bridge.limits.max_body_bytes
    )
    app.router.add_get("/v1/attestation", bridge.attestation, name="attestation")
    app.router.add_post("/v1/infer", bridge.infer, name="infer")
    app.router.add_get("/healthz", bridge.healthz, name="healthz")
    app.router.add_get("/metrics", bridge.metrics_text, name="metrics")
    return app


class BridgeServer:
    """A running bridge; :attr:`address` is where it listens (with the real port if 0 was asked)."""

    def __init__(self, runner: web.AppRunner, address: Address) -> None:
        self._runner = runner
        self.address = address

    async def close(self) -> None:
        await self._runner.cleanup()

    async def __aenter__(self) -> BridgeServer:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()


async def start_bridge(
    app: web.Application,
    address: Address | tuple[str, int],
    *,
    limits: BridgeLimits | None = None,
    shutdown_timeout: float = 5.0,
) -> BridgeServer:
    """Serve ``app`` on ``address``: ``tcp://HOST:PORT``, ``unix://PATH``, or a ``(host, port)``
    pair where port 0 picks a free port (tests, the demo). :attr:`BridgeServer.address` is the
    address bound.

    A consumer that does not finish its request headers within ``client_read_timeout`` is
    disconnected (the server's keep-alive timeout covers the time before a request is parsed).
    """
    limits = limits or BridgeLimits()
    runner = web.AppRunner(
        app,
        keepalive_timeout=limits.client_read_timeout,
        shutdown_timeout=shutdown_timeout,
        # after refusing a body (413, 408, 429), discard what is in flight for at most this long
        # (never kept) so the consumer can read the answer before the connection closes
        lingering_time=limits.linger,
        # a consumer that leaves cancels its handler: the stream is released and the enclave
        # told to stop generating for it
        handler_cancellation=True,
    )
    await runner.setup()
    try:
        site: web.BaseSite
        if isinstance(address, tuple):
            site = web.TCPSite(runner, address[0], address[1])
        elif address.kind == "tcp":
            site = web.TCPSite(runner, address.host, address.port)
        elif address.kind == "unix" and address.path is not None:
            site = web.UnixSite(runner, address.path)
        else:
            raise ConfigError("the bridge listens on tcp://HOST:PORT or unix://PATH")
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise TransportError(f"listen on {address}: {exc.strerror or type(exc).__name__}") from None
    except BaseException:
        await runner.cleanup()
        raise
    if isinstance(address, tuple) or address.kind == "tcp":
        host, port = runner.addresses[0][:2]
        return BridgeServer(runner, Address("tcp", host=host, port=port))
    return BridgeServer(runner, address)
