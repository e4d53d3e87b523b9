"""The inference bodies (CBOR inside BHTTP): round trips, every cap, and hostile bodies."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.bhttp import Request, decode_request, encode_request
from protocol.errors import MalformedMessage
from protocol.inference import (
    MAX_BODY_SIZE,
    MAX_IMAGE_BYTES,
    Image,
    InferenceRequest,
    InferenceResponse,
    Params,
    StreamDelta,
    StreamEnd,
    Usage,
    decode_request_body,
    decode_response_body,
    decode_stream_piece,
    encode_request_body,
    encode_response_body,
    encode_stream_piece,
    http_request,
    parse_http_request,
)
from protocol.ohttp import (
    decapsulate_request,
    encapsulate_chunked_request,
    encapsulate_request,
    generate_key_config,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 24
REQUEST = InferenceRequest(
    prompt="Describe both pictures. ✓",
    images=(Image("image/png", PNG), Image("image/jpeg", JPEG)),
    params=Params(max_tokens=128, temperature=0.7, top_p=0.9, stop=("\n\n",), stream=True),
)
RESPONSE = InferenceResponse("Two cats.", "stop", Usage(prompt_tokens=812, completion_tokens=4))


def body(**overrides: Any) -> dict[str, Any]:
    """A valid request body as a plain dict, with top-level or ``params.*`` overrides."""
    value: dict[str, Any] = cbor2.loads(encode_request_body(REQUEST))
    for key, item in overrides.items():
        if key.startswith("params_"):
            value["params"][key.removeprefix("params_")] = item
        elif item is _DELETE:
            del value[key]
        else:
            value[key] = item
    return value


_DELETE = object()


# --- Round trips ----------------------------------------------------------------------------------


def test_request_body_round_trip() -> None:
    assert decode_request_body(encode_request_body(REQUEST)) == REQUEST


def test_request_body_is_deterministic_and_has_exactly_the_documented_keys() -> None:
    encoded = encode_request_body(REQUEST)
    assert encoded == cbor2.dumps(cbor2.loads(encoded), canonical=True)
    value = cbor2.loads(encoded)
    assert set(value) == {"v", "prompt", "images", "params"}
    assert value["v"] == 1
    assert set(value["params"]) == {"max_tokens", "temperature", "top_p", "stop", "stream"}
    assert value["images"][0] == {"media_type": "image/png", "data": PNG}


def test_defaults() -> None:
    request = InferenceRequest("hi")
    assert request.params == Params(256, 1.0, 1.0, (), False)
    assert decode_request_body(encode_request_body(request)) == request


def test_integers_are_accepted_for_the_float_fields() -> None:
    decoded = decode_request_body(cbor2.dumps(body(params_temperature=1, params_top_p=1)))
    assert decoded.params.temperature == 1.0
    assert type(decoded.params.temperature) is float


def test_response_and_pieces_round_trip() -> None:
    assert decode_response_body(encode_response_body(RESPONSE)) == RESPONSE
    for piece in (StreamDelta("Two"), StreamDelta(""), StreamEnd("length", Usage(1, 2))):
        assert decode_stream_piece(encode_stream_piece(piece)) == piece
    assert cbor2.loads(encode_stream_piece(StreamDelta("x"))) == {"v": 1, "delta": "x"}


def test_http_request_round_trip_and_shape() -> None:
    data = http_request(REQUEST)
    request = decode_request(data)
    assert (request.method, request.scheme, request.path) == ("POST", "https", "/v1/infer")
    assert request.headers == (("content-type", "application/cbor"),)
    assert parse_http_request(data) == REQUEST


def test_through_oblivious_http() -> None:
    sk, config = generate_key_config(1)
    encapsulated, _ = encapsulate_request(config, http_request(REQUEST))
    plaintext, _ = decapsulate_request(sk, config, encapsulated)
    assert parse_http_request(plaintext) == REQUEST
    writer, _ = encapsulate_chunked_request(config)
    assert writer.final(http_request(REQUEST))[:1] == b"\x01"


# --- Caps and hostile bodies ----------------------------------------------------------------------

BIG_IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(MAX_IMAGE_BYTES - 7)
HOSTILE_BODIES: dict[str, object] = {
    "not a map": [1, 2],
    "missing params": body(params=_DELETE),
    "unknown key": {**body(), "model": "other"},
    "version 2": body(v=2),
    "version as text": body(v="1"),
    "prompt not text": body(prompt=b"bytes"),
    "prompt over 16 KiB": body(prompt="x" * (16 * 1024 + 1)),
    "prompt over 16 KiB of UTF-8": body(prompt="é" * (8 * 1024 + 1)),
    "five images": body(images=[{"media_type": "image/png", "data": PNG}] * 5),
    "images not an array": body(images={"media_type": "image/png", "data": PNG}),
    "image media type gif": body(images=[{"media_type": "image/gif", "data": b"GIF89a"}]),
    "image with an extra key": body(
        images=[{"media_type": "image/png", "data": PNG, "name": "cat.png"}]
    ),
    "image data as text": body(images=[{"media_type": "image/png", "data": "iVBOR"}]),
    "empty image": body(images=[{"media_type": "image/png", "data": b""}]),
    "JPEG labelled PNG": body(images=[{"media_type": "image/png", "data": JPEG}]),
    "image over 4 MiB": body(images=[{"media_type": "image/png", "data": BIG_IMAGE}]),
    "max_tokens 0": body(params_max_tokens=0),
    "max_tokens 4097": body(params_max_tokens=4097),
    "max_tokens as bool": body(params_max_tokens=True),
    "max_tokens as float": body(params_max_tokens=16.0),
    "negative temperature": body(params_temperature=-0.1),
    "temperature over 2": body(params_temperature=2.01),
    "temperature as bool": body(params_temperature=False),
    "temperature NaN": body(params_temperature=float("nan")),
    "top_p 0": body(params_top_p=0.0),
    "top_p over 1": body(params_top_p=1.5),
    "top_p infinite": body(params_top_p=float("inf")),
    "stop not an array": body(params_stop="\n"),
    "nine stop sequences": body(params_stop=["a"] * 9),
    "empty stop sequence": body(params_stop=[""]),
    "stop sequence over 256 bytes": body(params_stop=["x" * 257]),
    "stream as int": body(params_stream=1),
    "unknown param": body(params_seed=3),
}


@pytest.mark.parametrize("value", HOSTILE_BODIES.values(), ids=HOSTILE_BODIES.keys())
def test_rejects_hostile_request_body(value: object) -> None:
    with pytest.raises(MalformedMessage):
        decode_request_body(cbor2.dumps(value))


HOSTILE_BYTES: dict[str, bytes] = {
    "empty": b"",
    "not CBOR": b"\xff\xff",
    "trailing bytes": encode_request_body(REQUEST) + b"\x00",
    "tagged": cbor2.dumps(cbor2.CBORTag(24, encode_request_body(REQUEST))),
    "duplicate key": b"\xa2\x61v\x01\x61v\x01",
    "over 16 MiB": encode_request_body(REQUEST) + bytes(MAX_BODY_SIZE),
    "deeply nested": b"\x81" * 100 + b"\x00",
}


@pytest.mark.parametrize("data", HOSTILE_BYTES.values(), ids=HOSTILE_BYTES.keys())
def test_rejects_hostile_request_bytes(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_request_body(data)


HOSTILE_RESPONSES: dict[str, object] = {
    "finish reason unknown": {**cbor2.loads(encode_response_body(RESPONSE)), "finish_reason": "x"},
    "missing usage": {"v": 1, "text": "t", "finish_reason": "stop"},
    "negative tokens": {
        **cbor2.loads(encode_response_body(RESPONSE)),
        "usage": {"prompt_tokens": -1, "completion_tokens": 0},
    },
    "text over 1 MiB": {**cbor2.loads(encode_response_body(RESPONSE)), "text": "x" * (2**20 + 1)},
}


@pytest.mark.parametrize("value", HOSTILE_RESPONSES.values(), ids=HOSTILE_RESPONSES.keys())
def test_rejects_hostile_response_body(value: object) -> None:
    with pytest.raises(MalformedMessage):
        decode_response_body(cbor2.dumps(value))


HOSTILE_PIECES: dict[str, object] = {
    "delta and finish reason": {"v": 1, "delta": "x", "finish_reason": "stop"},
    "delta not text": {"v": 1, "delta": b"x"},
    "end without usage": {"v": 1, "finish_reason": "stop"},
    "version 0": {"v": 0, "delta": "x"},
    "empty map": {},
    "delta over 64 KiB": {"v": 1, "delta": "x" * (64 * 1024 + 1)},
}


@pytest.mark.parametrize("value", HOSTILE_PIECES.values(), ids=HOSTILE_PIECES.keys())
def test_rejects_hostile_stream_piece(value: object) -> None:
    with pytest.raises(MalformedMessage):
        decode_stream_piece(cbor2.dumps(value))


def http(**changes: Any) -> bytes:
    fields: dict[str, Any] = {
        "method": "POST",
        "scheme": "https",
        "authority": "",
        "path": "/v1/infer",
        "headers": (("content-type", "application/cbor"),),
        "content": encode_request_body(REQUEST),
    }
    return encode_request(Request(**{**fields, **changes}))


HOSTILE_HTTP: dict[str, bytes] = {
    "GET": http(method="GET"),
    "other path": http(path="/v1/admin"),
    "http scheme": http(scheme="http"),
    "JSON content type": http(headers=(("content-type", "application/json"),)),
    "no content type": http(headers=()),
    "two content types": http(
        headers=(("content-type", "application/cbor"), ("content-type", "application/cbor"))
    ),
    "trailers": http(trailers=(("x", "y"),)),
    "empty body": http(content=b""),
    "response instead": b"\x01\x40\xc8",
}


@pytest.mark.parametrize("data", HOSTILE_HTTP.values(), ids=HOSTILE_HTTP.keys())
def test_rejects_hostile_http_request(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        parse_http_request(data)


def test_constructors_enforce_the_same_caps() -> None:
    bad: list[Callable[[], object]] = [
        lambda: InferenceRequest("x" * 20000),
        lambda: InferenceRequest("x", images=(Image("image/png", PNG),) * 5),
        lambda: Image("image/png", JPEG),
        lambda: Params(max_tokens=5000),
        lambda: Params(temperature=3.0),
        lambda: Params(top_p=0.0),
        lambda: Params(stop=["a"]),  # type: ignore[arg-type]
        lambda: Usage(-1, 0),
        lambda: InferenceResponse("t", "eos", Usage(0, 0)),  # type: ignore[arg-type]
        lambda: StreamEnd("stop", None),  # type: ignore[arg-type]
        lambda: InferenceRequest("\ud800"),
    ]
    for make in bad:
        with pytest.raises(MalformedMessage):
            make()
    with pytest.raises(MalformedMessage):
        encode_stream_piece("delta")  # type: ignore[arg-type]


# --- Properties -----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80))
def test_decoders_raise_only_malformed_message(data: bytes) -> None:
    for decode in (
        decode_request_body,
        decode_response_body,
        decode_stream_piece,
        parse_http_request,
    ):
        with contextlib.suppress(MalformedMessage):
            decode(data)


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8), st.binary(max_size=8)
)
PLAIN = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(PLAIN, st.sampled_from(["prompt", "images", "params", "params_stop", "params_top_p"]))
def test_any_value_in_any_field_raises_only_malformed_message(value: object, key: str) -> None:
    for decode in (decode_request_body, decode_response_body, decode_stream_piece):
        with contextlib.suppress(MalformedMessage):
            decode(cbor2.dumps(body(**{key: value})))
