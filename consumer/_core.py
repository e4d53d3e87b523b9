"""The I/O-free core both clients share: inputs, the request's padding and encapsulation, opening
answers, reading error answers, the attestation cache and the rule for re-attesting.

Each request goes (docs/request-path.md):

1. attest, unless a verified attestation younger than ``max_age`` is cached: a fresh 32-byte
   nonce → ``GET /v1/attestation?nonce=HEX`` → :func:`consumer.attest.verify_attestation` (chain,
   expected PCRs, debug mode, nonce, age, user_data and the pinned model, key binding);
2. pad the Binary HTTP request with zeros to its size class (RFC 9292 §3.8,
   :func:`protocol.bhttp.pad`), so its ciphertext's length tells the parent only the size class
   of the prompt and images, then encapsulate it (RFC 9458 §4.3) to the attested key:
   ``message/ohttp-req``, or ``message/ohttp-chunked-req`` for a stream (the whole request in its
   final chunk);
3. ``POST /v1/infer``; re-attest and retry once (:func:`retry_with_fresh_key`) on a 422
   ``ohttp-key`` problem (RFC 9458 §5.3), or on a 400 to a request sent under a cached
   attestation (a restarted enclave drew the same key id);
4. decapsulate with this request's HPKE context (RFC 9458 §4.4; chunked draft "Response
   Encapsulation"): a response sealed for any other request, tampered, or cut short does not
   authenticate and is :class:`~consumer.errors.ResponseInvalid`. A stream yields each piece as its
   chunk authenticates and fails unless the final chunk (AAD ``"final"``) carried the end piece: a
   truncated answer is never passed off as complete.

The transports are ``consumer.client`` (urllib3, blocking) and ``consumer._async`` (aiohttp).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Protocol
from urllib.parse import urlsplit

from attestation import ExpectedMeasurements, Nonce, TrustRoot
from attestation.document import MAX_DOCUMENT_SIZE
from consumer.attest import (
    Attestation,
    Expectation,
    RootSource,
    check_manifest_sha256,
    check_model_id,
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
)
from protocol.bhttp import PAD_STEP, pad
from protocol.control import MAX_INFER_REQUEST
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

ATTESTATION_PATH: Final = "/v1/attestation"
OHTTP_KEY_PROBLEM: Final = "https://iana.org/assignments/http-problem-types#ohttp-key"
DEFAULT_TIMEOUT: Final = 60.0  # seconds: connecting, and each read (the gap between tokens)
MAX_PROBLEM: Final = 64 * 1024  # an error answer's body
# a single answer: a body of at most MAX_SMALL_BODY with its BHTTP framing, padded up to the next
# multiple of 64 KiB, plus the response nonce and the AEAD tag
MAX_SINGLE_RESPONSE: Final = MAX_SMALL_BODY + 2 * PAD_STEP
MAX_STREAM: Final = 4 * 1024 * 1024  # a chunked response: text ≤ 1 MiB plus per-piece framing
READ_SIZE: Final = 64 * 1024
_MAX_TIMEOUT: Final = 3600.0
# the padded BHTTP request: its encapsulation (hdr 7 + enc 32 + the final chunk's varint 1 + tag 16)
# must stay within the bridge's cap on a request body
_ENCAPSULATION_OVERHEAD: Final = 64
MAX_PADDED_REQUEST: Final = MAX_INFER_REQUEST - _ENCAPSULATION_OVERHEAD

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


def utc_now() -> datetime:
    return datetime.now(UTC)


# --- Configuration and inputs --------------------------------------------------------------------


def base_url(url: str) -> str:
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


def check_timeout(timeout: float) -> float:
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or not 0 < timeout <= _MAX_TIMEOUT
    ):
        raise ConfigError(f"timeout must be a number of seconds in (0, {_MAX_TIMEOUT:.0f}]")
    return float(timeout)


def check_max_age(max_age: timedelta) -> timedelta:
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


# --- One exchange: the request sealed to one key, and its answer opened --------------------------


@dataclass
class Exchange:
    """One request encapsulated to one attested key, and the context that alone opens its answer."""

    attestation: Attestation
    content_type: str
    response_type: str
    body: bytes
    context: ClientContext

    @classmethod
    def prepare(cls, attestation: Attestation, request: InferenceRequest) -> Exchange:
        try:
            # (1) zero padding to the size class (RFC 9292 §3.8): the parent sees lengths only
            message = pad(http_request(request), limit=MAX_PADDED_REQUEST)
            # (2) sealed to the attested key (RFC 9458 §4.3; chunked: the whole request in the
            # final chunk, AAD "final")
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
            raise InvalidRequest(f"the request is too large for the bridge: {exc}") from None
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

    def piece_reader(self) -> PieceReader:
        return PieceReader(self.context.chunked_response_reader(max_size=MAX_STREAM))


class PieceReader:
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


# --- Error answers -------------------------------------------------------------------------------


class Headers(Protocol):
    def get(self, key: str, /) -> str | None: ...


def status_error(status: int, headers: Headers, body: bytes) -> ServerError:
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


def retry_with_fresh_key(error: ServerError, *, cached: bool) -> bool:
    """Whether ``error``, the answer to a request sent under an attestation that was ``cached``
    (not made for this request), calls for forgetting that attestation, attesting again and
    retrying once.

    (a) 422 ``ohttp-key`` (RFC 9458 §5.3): the enclave no longer holds the key.
    (b) 400 under a cached attestation: key ids are one byte (RFC 9458 §3.1), so an enclave
        restarted since it was attested may have drawn the same id for its new key; the request
        then names a known id but was sealed to the old key, and the enclave can only answer
        ``malformed``. Under an attestation made for this request a 400 is the request's own fault
        and is raised.
    """
    return isinstance(error, StaleKey) or (cached and error.status == 400)


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


def too_large_document() -> AttestationFailed:
    return AttestationFailed(
        f"the attestation document is larger than {MAX_DOCUMENT_SIZE} bytes",
        reason="MalformedDocument",
    )


# --- What both clients share ---------------------------------------------------------------------


class ClientCore:
    """Configuration, the attestation cache, and verification of what the bridge returns."""

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
        expect_model_id: str | None = None,
        expect_manifest_sha256: bytes | str | None = None,
    ) -> None:
        self.url = base_url(url)
        self.measurements: ExpectedMeasurements = load_measurements(expect)
        self.roots = load_roots(roots, trust_local_root)
        self.max_age = check_max_age(max_age)
        self.timeout = check_timeout(timeout)
        self.expect_model_id = None if expect_model_id is None else check_model_id(expect_model_id)
        self.expect_manifest_sha256 = (
            None
            if expect_manifest_sha256 is None
            else check_manifest_sha256(expect_manifest_sha256)
        )
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
            model_id=self.expect_model_id,
            manifest_sha256=self.expect_manifest_sha256,
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
