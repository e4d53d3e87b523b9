"""The inference request and response bodies: versioned CBOR inside Binary HTTP.

A consumer's prompt travels as the content of a BHTTP ``POST /v1/infer`` (``content-type:
application/cbor``) inside an Oblivious HTTP request; the completion comes back the same way, or
as a stream of pieces, one per chunk of a chunked OHTTP response.

Bodies are CBOR maps with text keys (RFC 8949), written in core deterministic encoding and read
with the strict decoder (``protocol._cbor``: one item, no trailing bytes, no tags, no duplicate
keys, at most 64 data items, arrays and maps of at most 8 entries). Every key is required and no
other key is allowed, except a piece's optional ``"pad"``::

    request  {"v": 1, "prompt": text, "images": [{"media_type": text, "data": bytes}…],
              "params": {"max_tokens": uint, "temperature": float, "top_p": float,
                         "stop": [text…], "stream": bool}}
    response {"v": 1, "text": text, "finish_reason": "stop" | "length",
              "usage": {"prompt_tokens": uint, "completion_tokens": uint}}
    piece    {"v": 1, "delta": text, ? "pad": bytes}                     (a streamed piece)
             {"v": 1, "finish_reason": "stop" | "length", "usage": {…}, ? "pad": bytes}
                                                                          (the last piece)

Padding, because a ciphertext's length is the one thing the parent still sees: each piece is one
chunk of the chunked response, so an unpadded piece would give away the length of every token.
:func:`encode_stream_piece` adds ``"pad"``, zero bytes, so that the encoded piece is a multiple of
:data:`PIECE_BLOCK` (64) bytes: every delta of up to about 40 bytes of text encodes to exactly 64
bytes. ``"pad"`` must hold only zero bytes; :func:`decode_stream_piece` checks and drops it, and
accepts pieces without it (still version 1: the key is optional). :func:`http_response` pads the
whole Binary HTTP response to its size class (:func:`protocol.bhttp.pad`), so a non-streamed answer
reveals only that (at least 512 bytes: "no" and "yes" look the same).

Caps: prompt ≤ 16 KiB of UTF-8; ≤ 4 images of ``image/png`` or ``image/jpeg``, each 1 byte..4 MiB
and starting with its format's signature; body ≤ 16 MiB; ``max_tokens`` 1..4096; ``temperature``
0..2; ``top_p`` in (0, 1]; ≤ 8 stop sequences of 1..256 bytes; response text ≤ 1 MiB; a piece's
delta ≤ 64 KiB. Integers are accepted for the float fields (a JSON-minded encoder may write ``1``
for ``1.0``); booleans never count as numbers.

Every ``encode_*`` and ``decode_*`` function raises only :class:`MalformedMessage`, naming the field
and the rule and never quoting content.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final, Literal

from protocol._cbor import CborRejected, canonical_dumps, strict_loads
from protocol.bhttp import (
    Request,
    Response,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    pad,
)
from protocol.errors import MalformedMessage

__all__ = [
    "CONTENT_TYPE",
    "INFER_PATH",
    "MAX_BODY_SIZE",
    "PIECE_BLOCK",
    "VERSION",
    "Image",
    "InferenceRequest",
    "InferenceResponse",
    "Params",
    "StreamDelta",
    "StreamEnd",
    "Usage",
    "decode_request_body",
    "decode_response_body",
    "decode_stream_piece",
    "encode_request_body",
    "encode_response_body",
    "encode_stream_piece",
    "http_request",
    "http_response",
    "parse_http_request",
    "parse_http_response",
]

VERSION: Final = 1
INFER_PATH: Final = "/v1/infer"
CONTENT_TYPE: Final = "application/cbor"

MAX_BODY_SIZE: Final = 16 * 1024 * 1024
MAX_PROMPT_BYTES: Final = 16 * 1024
MAX_IMAGES: Final = 4
MAX_IMAGE_BYTES: Final = 4 * 1024 * 1024
MAX_TOKENS: Final = 4096
MAX_STOP_SEQUENCES: Final = 8
MAX_STOP_BYTES: Final = 256
MAX_TEXT_BYTES: Final = 1024 * 1024
MAX_DELTA_BYTES: Final = 64 * 1024
MAX_SMALL_BODY: Final = 2 * 1024 * 1024  # responses and pieces, checked before decoding
MAX_TOKEN_COUNT: Final = 1 << 32  # usage counters
PIECE_BLOCK: Final = 64  # streamed pieces are padded to a multiple of this many bytes
_MAX_DEPTH: Final = 4
# Counted while decoding, before anything is built (protocol._cbor): a request is at most 47 items
# (4 images, 8 stop sequences) and no array or map of ours has more than 8 entries.
_MAX_ITEMS: Final = 64
_MAX_ENTRIES: Final = 8

MediaType = Literal["image/png", "image/jpeg"]
FinishReason = Literal["stop", "length"]

# The first bytes of each accepted image format (PNG: ISO/IEC 15948 §5.2; JPEG: SOI + a marker).
_SIGNATURES: Final[dict[str, bytes]] = {
    "image/png": b"\x89PNG\r\n\x1a\n",
    "image/jpeg": b"\xff\xd8\xff",
}
_FINISH_REASONS: Final = frozenset({"stop", "length"})


# --- Validation helpers ---------------------------------------------------------------------------


def _map(value: object, what: str, keys: frozenset[str]) -> dict[str, object]:
    if type(value) is not dict:
        raise MalformedMessage(f"{what} must be a map")
    present = set(value)
    if present != keys:
        missing = sorted(keys - present)
        unknown = len(present - keys)
        raise MalformedMessage(f"{what}: missing keys {missing}, {unknown} unknown keys")
    return value


def _version(value: object, what: str) -> None:
    if type(value) is not int or value != VERSION:
        raise MalformedMessage(f"{what}.v must be {VERSION}")


def _text(value: object, what: str, max_bytes: int, *, empty: bool = True) -> str:
    if type(value) is not str:
        raise MalformedMessage(f"{what} must be text")
    if len(value) > max_bytes:  # characters ≤ UTF-8 bytes: a cheap first bound
        raise MalformedMessage(f"{what} is longer than {max_bytes} bytes")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise MalformedMessage(f"{what} is not valid Unicode (lone surrogate)") from None
    if size > max_bytes:
        raise MalformedMessage(f"{what} is longer than {max_bytes} bytes")
    if not empty and size == 0:
        raise MalformedMessage(f"{what} must not be empty")
    return value


def _uint(value: object, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise MalformedMessage(f"{what} must be an integer in {low}..{high}")
    return value


def _number(value: object, what: str) -> float:
    if type(value) is int:
        value = float(value)
    if type(value) is not float or not math.isfinite(value):
        raise MalformedMessage(f"{what} must be a finite number")
    return value


def _bool(value: object, what: str) -> bool:
    if type(value) is not bool:
        raise MalformedMessage(f"{what} must be true or false")
    return value


def _loads(data: object, what: str, limit: int) -> object:
    if type(data) is not bytes:
        raise MalformedMessage(f"{what} must be bytes")
    if len(data) > limit:
        raise MalformedMessage(f"{what} is larger than {limit} bytes")
    try:
        return strict_loads(
            data,
            max_depth=_MAX_DEPTH,
            floats=True,
            max_items=_MAX_ITEMS,
            max_length=_MAX_ENTRIES,
        )
    except CborRejected as exc:
        raise MalformedMessage(f"{what}: {exc}") from None


def _dumps(value: object, what: str, limit: int) -> bytes:
    try:
        data = canonical_dumps(value)
    except CborRejected as exc:
        raise MalformedMessage(f"{what}: {exc}") from None
    if len(data) > limit:
        raise MalformedMessage(f"{what} is larger than {limit} bytes")
    return data


# --- Request --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """One image of a prompt: its media type and encoded bytes (PNG or JPEG)."""

    media_type: MediaType
    data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_image(self.media_type, self.data, "image")


def _check_image(media_type: object, data: object, what: str) -> None:
    if type(media_type) is not str or media_type not in _SIGNATURES:
        raise MalformedMessage(f"{what}.media_type must be one of {sorted(_SIGNATURES)}")
    if type(data) is not bytes or not 0 < len(data) <= MAX_IMAGE_BYTES:
        raise MalformedMessage(f"{what}.data must be 1..{MAX_IMAGE_BYTES} bytes")
    if not data.startswith(_SIGNATURES[media_type]):
        raise MalformedMessage(f"{what}.data does not start with the {media_type} signature")


@dataclass(frozen=True)
class Params:
    """Sampling parameters, with their defaults."""

    max_tokens: int = 256  # 1..4096 completion tokens
    temperature: float = 1.0  # 0..2; 0 means greedy
    top_p: float = 1.0  # nucleus mass, (0, 1]
    stop: tuple[str, ...] = ()  # at most 8 sequences of 1..256 UTF-8 bytes
    stream: bool = False  # answer with a chunked response of pieces

    def __post_init__(self) -> None:
        _uint(self.max_tokens, "params.max_tokens", 1, MAX_TOKENS)
        temperature = _number(self.temperature, "params.temperature")
        if not 0.0 <= temperature <= 2.0:
            raise MalformedMessage("params.temperature must be in 0..2")
        top_p = _number(self.top_p, "params.top_p")
        if not 0.0 < top_p <= 1.0:
            raise MalformedMessage("params.top_p must be in (0, 1]")
        if type(self.stop) is not tuple or len(self.stop) > MAX_STOP_SEQUENCES:
            raise MalformedMessage(f"params.stop must hold at most {MAX_STOP_SEQUENCES} sequences")
        for i, stop in enumerate(self.stop):
            _text(stop, f"params.stop[{i}]", MAX_STOP_BYTES, empty=False)
        _bool(self.stream, "params.stream")
        # Normalise integers given for the float fields (frozen: through object.__setattr__).
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "top_p", top_p)


@dataclass(frozen=True)
class InferenceRequest:
    """A prompt (text and images) and its sampling parameters. Validated when built."""

    prompt: str
    images: tuple[Image, ...] = ()
    params: Params = field(default_factory=Params)

    def __post_init__(self) -> None:
        _text(self.prompt, "prompt", MAX_PROMPT_BYTES)
        if type(self.images) is not tuple or len(self.images) > MAX_IMAGES:
            raise MalformedMessage(f"images must hold at most {MAX_IMAGES} images")
        for i, image in enumerate(self.images):
            if type(image) is not Image:
                raise MalformedMessage(f"images[{i}] must be an Image")
        if type(self.params) is not Params:
            raise MalformedMessage("params must be a Params")


_REQUEST_KEYS: Final = frozenset({"v", "prompt", "images", "params"})
_IMAGE_KEYS: Final = frozenset({"media_type", "data"})
_PARAMS_KEYS: Final = frozenset({"max_tokens", "temperature", "top_p", "stop", "stream"})


def encode_request_body(request: InferenceRequest) -> bytes:
    """The CBOR body of ``request`` (core deterministic encoding)."""
    if type(request) is not InferenceRequest:
        raise MalformedMessage("request must be an InferenceRequest")
    p = request.params
    value = {
        "v": VERSION,
        "prompt": request.prompt,
        "images": [{"media_type": i.media_type, "data": i.data} for i in request.images],
        "params": {
            "max_tokens": p.max_tokens,
            "temperature": float(p.temperature),
            "top_p": float(p.top_p),
            "stop": list(p.stop),
            "stream": p.stream,
        },
    }
    return _dumps(value, "request body", MAX_BODY_SIZE)


def decode_request_body(data: bytes) -> InferenceRequest:
    """Decode and check a request body. ``data`` is untrusted: it comes from a consumer."""
    body = _map(_loads(data, "request body", MAX_BODY_SIZE), "request", _REQUEST_KEYS)
    _version(body["v"], "request")
    images_raw = body["images"]
    if type(images_raw) is not list or len(images_raw) > MAX_IMAGES:
        raise MalformedMessage(f"request.images must be an array of at most {MAX_IMAGES}")
    images = []
    for i, raw in enumerate(images_raw):
        item = _map(raw, f"request.images[{i}]", _IMAGE_KEYS)
        _check_image(item["media_type"], item["data"], f"request.images[{i}]")
        images.append(Image(item["media_type"], item["data"]))  # type: ignore[arg-type]
    params = _map(body["params"], "request.params", _PARAMS_KEYS)
    stop = params["stop"]
    if type(stop) is not list:
        raise MalformedMessage("request.params.stop must be an array")
    return InferenceRequest(
        prompt=_text(body["prompt"], "request.prompt", MAX_PROMPT_BYTES),
        images=tuple(images),
        params=Params(
            max_tokens=params["max_tokens"],  # type: ignore[arg-type]  # checked by Params
            temperature=params["temperature"],  # type: ignore[arg-type]
            top_p=params["top_p"],  # type: ignore[arg-type]
            stop=tuple(stop),
            stream=params["stream"],  # type: ignore[arg-type]
        ),
    )


# --- Response and streamed pieces -----------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """Token counts of one completion."""

    prompt_tokens: int
    completion_tokens: int

    def __post_init__(self) -> None:
        _uint(self.prompt_tokens, "usage.prompt_tokens", 0, MAX_TOKEN_COUNT)
        _uint(self.completion_tokens, "usage.completion_tokens", 0, MAX_TOKEN_COUNT)


def _check_finish_reason(value: object, what: str) -> None:
    if type(value) is not str or value not in _FINISH_REASONS:
        raise MalformedMessage(f"{what} must be one of {sorted(_FINISH_REASONS)}")


@dataclass(frozen=True)
class InferenceResponse:
    """A whole completion."""

    text: str
    finish_reason: FinishReason
    usage: Usage

    def __post_init__(self) -> None:
        _text(self.text, "text", MAX_TEXT_BYTES)
        _check_finish_reason(self.finish_reason, "finish_reason")
        if type(self.usage) is not Usage:
            raise MalformedMessage("usage must be a Usage")


@dataclass(frozen=True)
class StreamDelta:
    """A streamed piece of completion text."""

    text: str

    def __post_init__(self) -> None:
        _text(self.text, "delta", MAX_DELTA_BYTES)


@dataclass(frozen=True)
class StreamEnd:
    """The last streamed piece: why the completion stopped, and its token counts."""

    finish_reason: FinishReason
    usage: Usage

    def __post_init__(self) -> None:
        _check_finish_reason(self.finish_reason, "finish_reason")
        if type(self.usage) is not Usage:
            raise MalformedMessage("usage must be a Usage")


_USAGE_KEYS: Final = frozenset({"prompt_tokens", "completion_tokens"})
_RESPONSE_KEYS: Final = frozenset({"v", "text", "finish_reason", "usage"})
_DELTA_KEYS: Final = frozenset({"v", "delta"})
_END_KEYS: Final = frozenset({"v", "finish_reason", "usage"})
_PAD_KEY: Final = "pad"


def _usage_value(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}


def _decode_usage(value: object, what: str) -> Usage:
    usage = _map(value, what, _USAGE_KEYS)
    return Usage(usage["prompt_tokens"], usage["completion_tokens"])  # type: ignore[arg-type]


def encode_response_body(response: InferenceResponse) -> bytes:
    """The CBOR body of ``response``."""
    if type(response) is not InferenceResponse:
        raise MalformedMessage("response must be an InferenceResponse")
    value = {
        "v": VERSION,
        "text": response.text,
        "finish_reason": response.finish_reason,
        "usage": _usage_value(response.usage),
    }
    return _dumps(value, "response body", MAX_SMALL_BODY)


def decode_response_body(data: bytes) -> InferenceResponse:
    """Decode and check a response body. ``data`` is untrusted (it comes from the server)."""
    body = _map(_loads(data, "response body", MAX_SMALL_BODY), "response", _RESPONSE_KEYS)
    _version(body["v"], "response")
    _check_finish_reason(body["finish_reason"], "response.finish_reason")
    return InferenceResponse(
        text=_text(body["text"], "response.text", MAX_TEXT_BYTES),
        finish_reason=body["finish_reason"],  # type: ignore[arg-type]
        usage=_decode_usage(body["usage"], "response.usage"),
    )


def encode_stream_piece(piece: StreamDelta | StreamEnd) -> bytes:
    """The CBOR of one streamed piece (the plaintext of one chunk of a chunked response), padded
    with a ``"pad"`` of zero bytes to a multiple of :data:`PIECE_BLOCK` bytes."""
    value: dict[str, object]
    if type(piece) is StreamDelta:
        value = {"v": VERSION, "delta": piece.text}
    elif type(piece) is StreamEnd:
        value = {
            "v": VERSION,
            "finish_reason": piece.finish_reason,
            "usage": _usage_value(piece.usage),
        }
    else:
        raise MalformedMessage("a piece must be a StreamDelta or a StreamEnd")
    return _padded(value)


def _padded(value: dict[str, object]) -> bytes:
    bare = len(_dumps(value, "piece", MAX_SMALL_BODY))
    # "pad" adds its key (4 bytes: a text head and "pad") and a byte string (a 1-, 2- or 3-byte
    # head and the zeros); the map head stays one byte. Some totals no string length reaches
    # (a 25-byte string: 24 zeros take a 2-byte head); then the next block.
    target = max(PIECE_BLOCK, -(-(bare + 5) // PIECE_BLOCK) * PIECE_BLOCK)
    while True:
        room = target - bare - 4
        for head in (1, 2, 3):
            zeros = room - head
            if zeros >= 0 and _bytes_head(zeros) == head:
                data = _dumps({**value, _PAD_KEY: bytes(zeros)}, "piece", MAX_SMALL_BODY)
                if len(data) != target:  # pragma: no cover (the arithmetic above)
                    raise MalformedMessage("piece padding went wrong")
                return data
        target += PIECE_BLOCK


def _bytes_head(length: int) -> int:
    # RFC 8949 §3.1: the head of a byte string of ``length`` bytes
    return 1 if length < 24 else 2 if length < 256 else 3 if length < 65536 else 5


def _unpad(body: object) -> object:
    """``body`` without its optional ``"pad"``, which must be zero bytes."""
    if type(body) is not dict or _PAD_KEY not in body:
        return body
    padding = body.pop(_PAD_KEY)
    if type(padding) is not bytes or padding.count(0) != len(padding):
        raise MalformedMessage("piece.pad must be a byte string of zeros")
    return body


def decode_stream_piece(data: bytes) -> StreamDelta | StreamEnd:
    """Decode one streamed piece. ``data`` is untrusted (it comes from the server). Its optional
    ``"pad"`` (zero bytes) is checked and dropped."""
    body = _unpad(_loads(data, "piece", MAX_SMALL_BODY))
    if type(body) is dict and "delta" in body:
        delta = _map(body, "piece", _DELTA_KEYS)
        _version(delta["v"], "piece")
        return StreamDelta(_text(delta["delta"], "piece.delta", MAX_DELTA_BYTES))
    end = _map(body, "piece", _END_KEYS)
    _version(end["v"], "piece")
    _check_finish_reason(end["finish_reason"], "piece.finish_reason")
    return StreamEnd(end["finish_reason"], _decode_usage(end["usage"], "piece.usage"))  # type: ignore[arg-type]


# --- The HTTP request around the body -------------------------------------------------------------


def http_request(body: InferenceRequest, *, authority: str = "") -> bytes:
    """The BHTTP request carrying ``body``: ``POST https://{authority}/v1/infer`` with
    ``content-type: application/cbor`` (the plaintext of an OHTTP request)."""
    return encode_request(
        Request(
            method="POST",
            scheme="https",
            authority=authority,
            path=INFER_PATH,
            headers=(("content-type", CONTENT_TYPE),),
            content=encode_request_body(body),
        )
    )


def parse_http_request(data: bytes) -> InferenceRequest:
    """Decode the BHTTP request of :func:`http_request` and its body. ``data`` is untrusted (a
    consumer's decapsulated request). Anything but ``POST /v1/infer`` with a CBOR body is
    refused."""
    request = decode_request(data)
    if request.method != "POST" or request.path != INFER_PATH:
        raise MalformedMessage(f"request must be POST {INFER_PATH}")
    if request.scheme != "https":
        raise MalformedMessage("request scheme must be https")
    if request.header("content-type") != CONTENT_TYPE:
        raise MalformedMessage(f"request content-type must be {CONTENT_TYPE}")
    if request.trailers:
        raise MalformedMessage("request must not carry trailer fields")
    return decode_request_body(request.content)


def http_response(body: InferenceResponse) -> bytes:
    """The BHTTP 200 response carrying ``body`` (the plaintext of a non-streamed OHTTP response),
    padded with zeros to its size class (:func:`protocol.bhttp.pad`, RFC 9292 §3.8), so that its
    ciphertext's length reveals only that."""
    return pad(
        encode_response(
            Response(
                status=200,
                headers=(("content-type", CONTENT_TYPE),),
                content=encode_response_body(body),
            )
        )
    )


def parse_http_response(data: bytes) -> InferenceResponse:
    """Decode the BHTTP response of :func:`http_response` and its body. ``data`` is untrusted (it
    comes from the server, through the consumer's decapsulation). Anything but a 200 response
    with a CBOR body is refused."""
    response = decode_response(data)
    if response.status != 200:
        raise MalformedMessage(f"response status is {response.status}, not 200")
    if response.header("content-type") != CONTENT_TYPE:
        raise MalformedMessage(f"response content-type must be {CONTENT_TYPE}")
    if response.trailers:
        raise MalformedMessage("response must not carry trailer fields")
    return decode_response_body(response.content)
