"""The work of one inference request, in a worker thread: decapsulate, refuse replays, generate,
pad, encapsulate. The event loop only ever holds ciphertext.

Private to :mod:`enclave.server`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Final

from enclave._echo import Generation
from enclave._serving import Admission, OhttpKey, Ready, ReplayGuard
from enclave.errors import EnclaveError
from protocol.control import InferMode, InferRequest
from protocol.errors import DecapsulationError, MalformedMessage, UnknownKeyId
from protocol.inference import (
    MAX_DELTA_BYTES,
    InferenceResponse,
    StreamDelta,
    StreamEnd,
    Usage,
    encode_stream_piece,
    http_response,
    parse_http_request,
)
from protocol.ohttp import ServerContext, chunked_request_reader, decapsulate_request

__all__ = ["Job", "Refused", "Replayed"]

log = logging.getLogger("enclave.server")

_PIECE_CHARS: Final = MAX_DELTA_BYTES // 4  # characters per delta: ≤ 64 KiB in any UTF-8
_HANDOFF_WINDOW: Final = 8  # sealed chunks a worker may run ahead of the socket


class Refused(Exception):
    """A request is answered with ERROR ``code``."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class Replayed(Refused):
    """A request its key has already served: answered ``malformed``, counted apart."""

    def __init__(self) -> None:
        super().__init__("malformed")


class _Cancelled(Exception):
    """The stream was cancelled: stop generating."""


class Job:
    """One inference request, run in a worker thread. It hands each sealed chunk to the event loop
    through :attr:`queue` (then ``None`` at the end, or a :class:`Refused`), at most
    ``_HANDOFF_WINDOW`` chunks ahead of the socket; :meth:`cancel` stops it at the next piece.

    ``guard`` records the requests ``ready.key`` has served; ``rotate(key)`` replaces that key once
    the guard is full (from this thread)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        ready: Ready,
        guard: ReplayGuard,
        request: InferRequest,
        rotate: Callable[[OhttpKey], None],
    ) -> None:
        self._loop = loop
        self._ready = ready
        self._guard = guard
        self._request = request
        self._rotate = rotate
        self.queue: asyncio.Queue[bytes | Refused | None] = asyncio.Queue()
        self.window = threading.Semaphore(_HANDOFF_WINDOW)
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        if not self._cancelled.is_set():
            self._cancelled.set()
            self.window.release(_HANDOFF_WINDOW)  # wakes a worker waiting for the socket

    def run(self) -> None:
        outcome: Refused | None = None
        try:
            self._run()
        except _Cancelled:
            pass
        except Refused as refused:
            outcome = refused
        except Exception as exc:  # noqa: BLE001 - the boundary: any failure is "internal"
            log.error("inference failed (%s)", type(exc).__name__)
            outcome = Refused("internal")
        self._post(outcome)

    def _post(self, item: bytes | Refused | None) -> None:
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
            raise Refused("unknown_key") from None
        except (DecapsulationError, MalformedMessage):
            raise Refused("malformed") from None
        # (2) a request this key has served before is a replay (its enc is fresh per request)
        admission = self._guard.admit(context.enc)
        if admission is Admission.REPLAYED:
            log.warning("a replayed request was refused")
            raise Replayed
        if admission is Admission.RETIRED:
            raise Refused("unknown_key")  # the key was replaced while this request waited
        if admission is Admission.FRESH_AND_FULL:
            self._rotate(key)
        # (3) the BHTTP request and its CBOR body; the body's stream flag must match the mode
        try:
            inference = parse_http_request(plaintext)
        except MalformedMessage:
            raise Refused("malformed") from None
        del plaintext
        if inference.params.stream != (mode is InferMode.CHUNKED):
            raise Refused("malformed")
        self._check()
        # (4) the runtime validates eagerly: what it refuses is the consumer's input
        try:
            generation = self._ready.runtime.generate(
                inference.prompt, inference.images, inference.params
            )
        except EnclaveError:
            raise Refused("malformed") from None
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
        # (5a) mode 0: one message/ohttp-res holding the BHTTP 200 response, padded to its size
        # class by http_response (so "no" and "yes" seal to the same length)
        text = "".join(self._pieces(generation))
        response = InferenceResponse(
            text=text,
            finish_reason=generation.finish_reason,  # type: ignore[arg-type]  # checked there
            usage=Usage(generation.prompt_tokens, generation.completion_tokens),
        )
        self._emit(context.encapsulate_response(http_response(response)))

    def _chunked(self, context: ServerContext, generation: Generation) -> None:
        # (5b) mode 1: the response nonce travels with the first chunk; one sealed chunk per
        # piece as it is produced, each padded to a multiple of 64 bytes by encode_stream_piece
        # (so every token of up to ~40 bytes seals to the same length); StreamEnd in the final one
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
