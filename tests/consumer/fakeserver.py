"""A fake bridge for the consumer's tests: the HTTP API of docs/request-path.md, test-only.

It plays the parent and the enclave at once: real attestation documents from an
:class:`~attestation.EmulatedNsm` (state in the test's tmp_path), a real OHTTP key, and a trivial
model (the prompt upper-cased, one word per streamed piece), encapsulated exactly as the contract
says, padding included (mode 0: one ``message/ohttp-res`` whose BHTTP response is zero-padded to
its size class, :func:`protocol.bhttp.pad`; mode 1: a ``message/ohttp-chunked-res`` with one CBOR
piece per chunk, each padded by :func:`~protocol.inference.encode_stream_piece` with its ``pad``
field, and :class:`StreamEnd` in the final chunk). Knobs turn it hostile, one attack each.

It runs on its own event loop in a thread (:class:`LoopThread`), so that blocking clients, the
asynchronous client and the proxy can all talk to it from a test.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import cbor2
from aiohttp import web

from attestation import EmulatedNsm, NsmClient
from protocol.bhttp import pad
from protocol.control import InferMode, check_nonce
from protocol.errors import FrameError, OhttpError, UnknownKeyId
from protocol.inference import (
    InferenceRequest,
    InferenceResponse,
    StreamDelta,
    StreamEnd,
    Usage,
    encode_stream_piece,
    http_response,
    parse_http_request,
)
from protocol.ohttp import (
    MEDIA_TYPE_CHUNKED_RESPONSE,
    MEDIA_TYPE_RESPONSE,
    ServerContext,
    chunked_request_reader,
    decapsulate_request,
    encapsulate_chunked_request,
    encapsulate_request,
    generate_key_config,
)

T = TypeVar("T")

MEASUREMENTS: Mapping[int, bytes] = {0: b"\x10" * 48, 1: b"\x11" * 48, 2: b"\x12" * 48}
OTHER_MEASUREMENTS: Mapping[int, bytes] = {0: b"\x20" * 48, 1: b"\x11" * 48, 2: b"\x12" * 48}
MODEL_ID = "fake-shapes"
MANIFEST_SHA256 = hashlib.sha256(b"the fake bundle's manifest").digest()
OHTTP_KEY_PROBLEM = "https://iana.org/assignments/http-problem-types#ohttp-key"


def expect_yaml(measurements: Mapping[int, bytes]) -> str:
    return "".join(f"PCR{i}: '{v.hex()}'\n" for i, v in sorted(measurements.items()))


def answer_text(request: InferenceRequest) -> str:
    """The fake model: the prompt upper-cased, and how many images it saw."""
    return f"{request.prompt.upper()} ({len(request.images)} image(s))"


class LoopThread:
    """An asyncio event loop running in a daemon thread; :meth:`run` executes a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class Knobs:
    """One attack per knob; all off means an honest bridge and enclave."""

    nonce: bytes | None = None  # the document echoes this nonce, not the consumer's
    replay_document: bytes | None = None  # serve this document whatever the nonce
    user_data: bytes | None = None  # this user_data instead of the honest one
    public_key: bytes | None = None  # the document's public_key differs from the key config's
    attestation_status: int | None = None  # answer GET /v1/attestation with this status
    infer_status: int | None = None  # answer POST /v1/infer with this status (problem+json)
    infer_problem_type: str = "about:blank"
    retry_after: str | None = None
    rotate_key_on_infer: int = 0  # this many /v1/infer calls: rotate the key, answer 422 ohttp-key
    swap_context: bool = False  # answer with a context of another request
    truncate: bool = False  # chunked: end the HTTP body cleanly without the final chunk
    abort: bool = False  # chunked: drop the connection after the first pieces
    tamper: bool = False  # flip one bit in the encapsulated response
    end_early: bool = False  # chunked: the end piece in a non-final chunk
    content_type: str | None = None  # a wrong response content type
    hold: threading.Event | None = None  # chunked: after the first piece, wait until it is set


@dataclass
class FakeBridge:
    """The bridge and the enclave behind it, in one aiohttp application."""

    state_dir: Path
    measurements: Mapping[int, bytes] = field(default_factory=lambda: dict(MEASUREMENTS))
    debug_mode: bool = False
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    model_id: str = MODEL_ID
    knobs: Knobs = field(default_factory=Knobs)
    hits: list[str] = field(default_factory=list)
    received: list[InferenceRequest] = field(default_factory=list)
    request_sizes: list[int] = field(default_factory=list)  # encapsulated, as the parent sees them
    response_sizes: list[int] = field(default_factory=list)  # single (mode 0) answers, sealed

    def __post_init__(self) -> None:
        self.emulator = EmulatedNsm(
            state_dir=self.state_dir,
            measurements=self.measurements,
            debug_mode=self.debug_mode,
            clock=self.clock,
        )
        self.nsm = NsmClient(self.emulator)
        self.root_pem_path = self.state_dir / "nsm-root.pem"
        self.root_pem_path.write_bytes(self.emulator.root_pem)
        self.key_id = 7
        self.private_key, self.key_config = generate_key_config(self.key_id)

    @property
    def infer_count(self) -> int:
        return self.hits.count("POST /v1/infer")

    def rotate_key(self) -> None:
        self.key_id = (self.key_id + 1) % 256
        self.private_key, self.key_config = generate_key_config(self.key_id)

    def restart_with_same_key_id(self) -> None:
        """The enclave restarted and drew a new key with the same one-byte id: requests sealed
        to the old key name a known id but no longer decapsulate (``malformed``, 400)."""
        old = self.key_config
        self.private_key, self.key_config = generate_key_config(self.key_id)
        assert self.key_config[0] == old[0]
        assert self.key_config != old

    def user_data(self) -> bytes:
        value = {
            "v": 1,
            "ohttp_key_config": self.key_config,
            "model_id": self.model_id,
            "manifest_sha256": MANIFEST_SHA256,
        }
        return cbor2.dumps(value, canonical=True)

    def document(self, nonce: bytes) -> bytes:
        knobs = self.knobs
        if knobs.replay_document is not None:
            return knobs.replay_document
        public_key = knobs.public_key if knobs.public_key is not None else self.key_config[3:35]
        return self.nsm.attestation(
            nonce=knobs.nonce if knobs.nonce is not None else nonce,
            public_key=public_key,
            user_data=knobs.user_data if knobs.user_data is not None else self.user_data(),
        )

    # --- HTTP ---------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=17 * 1024 * 1024)
        app.router.add_get("/v1/attestation", self._attestation)
        app.router.add_post("/v1/infer", self._infer)
        return app

    async def _attestation(self, request: web.Request) -> web.StreamResponse:
        self.hits.append("GET /v1/attestation")
        if self.knobs.attestation_status is not None:
            return self._problem(self.knobs.attestation_status, "about:blank")
        try:
            nonce = check_nonce(bytes.fromhex(request.query.get("nonce", "")))
        except (ValueError, FrameError):
            return self._problem(400, "about:blank")
        return web.Response(body=self.document(nonce), content_type="application/cbor")

    def _problem(self, status: int, kind: str) -> web.Response:
        headers = {"Retry-After": self.knobs.retry_after} if self.knobs.retry_after else {}
        return web.json_response(
            {"type": kind, "title": f"fake error {status}", "status": status},
            status=status,
            content_type="application/problem+json",
            headers=headers,
        )

    async def _infer(self, request: web.Request) -> web.StreamResponse:
        self.hits.append("POST /v1/infer")
        knobs = self.knobs
        if knobs.rotate_key_on_infer > 0:
            knobs.rotate_key_on_infer -= 1
            self.rotate_key()
            return self._problem(422, OHTTP_KEY_PROBLEM)
        if knobs.infer_status is not None:
            return self._problem(knobs.infer_status, knobs.infer_problem_type)
        mode = InferMode.for_media_type(request.headers.get("Content-Type", ""))
        body = await request.read()
        self.request_sizes.append(len(body))
        try:
            if mode is InferMode.SINGLE:
                message, context = decapsulate_request(self.private_key, self.key_config, body)
            else:
                reader = chunked_request_reader(self.private_key, self.key_config)
                message = b"".join(reader.feed(body)) + reader.close()
                context = reader.context
            inference = parse_http_request(message)
        except UnknownKeyId:
            return self._problem(422, OHTTP_KEY_PROBLEM)
        except OhttpError:
            return self._problem(400, "about:blank")
        if inference.params.stream != (mode is InferMode.CHUNKED):
            return self._problem(400, "about:blank")
        self.received.append(inference)
        if knobs.swap_context:
            context = self._other_context(mode)
        text = answer_text(inference)
        usage = Usage(prompt_tokens=len(inference.prompt.split()), completion_tokens=len(text))
        if mode is InferMode.SINGLE:
            # padded to its size class (http_response pads too; pad() of a padded message is itself)
            data = context.encapsulate_response(
                pad(http_response(InferenceResponse(text, "stop", usage)))
            )
            self.response_sizes.append(len(data))
            return web.Response(
                body=self._tampered(data),
                content_type=knobs.content_type or MEDIA_TYPE_RESPONSE,
            )
        return await self._stream(request, context, text, usage)

    async def _stream(
        self, request: web.Request, context: ServerContext, text: str, usage: Usage
    ) -> web.StreamResponse:
        knobs = self.knobs
        response = web.StreamResponse(
            headers={"Content-Type": knobs.content_type or MEDIA_TYPE_CHUNKED_RESPONSE}
        )
        await response.prepare(request)
        writer = context.chunked_response()
        words = text.split(" ")
        pieces = [words[0]] + [" " + w for w in words[1:]]
        out = bytearray()
        for i, piece in enumerate(pieces):
            out += writer.chunk(encode_stream_piece(StreamDelta(piece)))
            if knobs.end_early and i == 0:
                out += writer.chunk(encode_stream_piece(StreamEnd("stop", usage)))
            if knobs.abort and i == 1:
                await response.write(bytes(out))
                assert request.transport is not None
                request.transport.close()
                return response
            await response.write(self._tampered(bytes(out)))
            out.clear()
            if knobs.hold is not None and i == 0:
                await asyncio.to_thread(knobs.hold.wait, 10)
        if not knobs.truncate:
            await response.write(writer.final(encode_stream_piece(StreamEnd("stop", usage))))
        await response.write_eof()
        return response

    def _tampered(self, data: bytes) -> bytes:
        if not self.knobs.tamper or len(data) < 40:
            return data
        flipped = bytearray(data)
        flipped[-1] ^= 0x01
        return bytes(flipped)

    def _other_context(self, mode: InferMode) -> ServerContext:
        """The context of a request this consumer never made: its answer must not open."""
        if mode is InferMode.SINGLE:
            other, _ = encapsulate_request(self.key_config, b"another request")
            return decapsulate_request(self.private_key, self.key_config, other)[1]
        writer, _ = encapsulate_chunked_request(self.key_config)
        reader = chunked_request_reader(self.private_key, self.key_config)
        reader.feed(writer.final(b"another request"))
        reader.close()
        return reader.context


async def start_site(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def tiny_png() -> bytes:
    """A real 1×1 PNG (ISO/IEC 15948): signature, IHDR, IDAT, IEND."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1×1, 8-bit RGB
    pixels = zlib.compress(b"\x00\xff\x00\x00")  # filter 0, one red pixel
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )
