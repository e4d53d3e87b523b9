"""The inference bodies (CBOR inside BHTTP): round trips, every cap, and hostile bodies."""

from __future__ import annotations

import contextlib
import time
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
    PIECE_BLOCK,
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
    http_response,
    parse_http_request,
    parse_http_response,
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
    assert cbor2.loads(encode_stream_piece(StreamDelta("x"))) == {
        "v": 1,
        "delta": "x",
        "pad": bytes(46),  # 12 bytes of piece, 4 of key, 2 of head: 64
    }


def test_unpadded_pieces_are_still_accepted() -> None:
    assert decode_stream_piece(cbor2.dumps({"v": 1, "delta": "x"})) == StreamDelta("x")
    end = {"v": 1, "finish_reason": "stop", "usage": {"prompt_tokens": 1, "completion_tokens": 2}}
    assert decode_stream_piece(cbor2.dumps(end)) == StreamEnd("stop", Usage(1, 2))
    assert decode_stream_piece(cbor2.dumps({**end, "pad": bytes(9)})) == StreamEnd(
        "stop", Usage(1, 2)
    )


# --- Length side channels -----------------------------------------------------------------------


def test_streamed_token_length_is_hidden_by_piece_padding() -> None:
    # every token of up to 47 bytes of UTF-8 encodes to the same 64 bytes: the chunk the parent
    # sees no longer tells "no" from "maybe" from "adenocarcinoma"
    sizes = {len(encode_stream_piece(StreamDelta("x" * n))) for n in range(48)}
    assert sizes == {PIECE_BLOCK}
    for n in range(48, 4 * 1024, 7):
        encoded = encode_stream_piece(StreamDelta("é" * (n // 2) + "x" * (n % 2)))
        assert len(encoded) % PIECE_BLOCK == 0
        assert decode_stream_piece(encoded) == StreamDelta("é" * (n // 2) + "x" * (n % 2))
    # the end piece too, whatever its counters
    ends = {StreamEnd("stop", Usage(1, 1)), StreamEnd("length", Usage(2**32, 2**32))}
    assert {len(encode_stream_piece(end)) for end in ends} == {2 * PIECE_BLOCK}


def test_single_answer_length_is_hidden_by_response_padding() -> None:
    # the reviewer's table: "no" and "yes" (and every short answer) were one byte apart
    answers = ("yes", "no", "red", "triangle", "x" * 300)
    messages = [http_response(InferenceResponse(a, "stop", Usage(40, 1))) for a in answers]
    assert {len(m) for m in messages} == {512}
    for answer, message in zip(answers, messages, strict=True):
        assert parse_http_response(message).text == answer  # the zeros are RFC 9292 padding
    longer = http_response(InferenceResponse("x" * 1000, "stop", Usage(1, 1)))
    assert len(longer) == 2048
    assert parse_http_response(longer).text == "x" * 1000


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
    "an array of 9 stop sequences": cbor2.dumps(body(params_stop=["a"] * 9)),
}


def _cbor_bomb(count: int, item: bytes) -> bytes:
    # the reviewer's body: a valid request map plus an "images" array of ``count`` tiny items
    head = cbor2.dumps({k: v for k, v in body().items() if k != "images"})
    return (
        bytes([head[0] + 1])
        + head[1:]
        + cbor2.dumps("images")
        + b"\x9a"
        + count.to_bytes(4, "big")
        + item * count
    )


@pytest.mark.parametrize("item", [b"\xa0", b"\x80", b"\x00"], ids=["maps", "arrays", "zeros"])
def test_rejects_cbor_item_bomb_before_building_it(item: bytes) -> None:
    data = _cbor_bomb(16_000_000, item)  # 15.3 MiB of one-byte items
    started = time.perf_counter()
    with pytest.raises(MalformedMessage, match="more than 8 entries"):
        decode_request_body(data)
    assert time.perf_counter() - started < 0.05  # refused at the array header: nothing decoded


def test_rejects_request_of_too_many_items_in_small_containers() -> None:
    # no container is over 8 entries, but the total is capped too: 8 maps of 8 arrays of 8
    nested = {
        "v": 1,
        "prompt": "",
        "images": [],
        "params": {f"k{i}": list(range(8)) for i in range(8)},
    }
    with pytest.raises(MalformedMessage, match="more than 64 CBOR data items"):
        decode_request_body(cbor2.dumps(nested))


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
    "padding with a non-zero byte": {"v": 1, "delta": "x", "pad": b"\x00\x01"},
    "padding as text": {"v": 1, "delta": "x", "pad": "  "},
    "padding and an unknown key": {"v": 1, "delta": "x", "pad": b"", "extra": 1},
    "padding alone": {"v": 1, "pad": bytes(8)},
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
