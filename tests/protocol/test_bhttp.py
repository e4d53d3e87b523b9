"""Binary HTTP (RFC 9292), known-length form: the RFC examples, QUIC varints, round trips and the
malformed messages a strict decoder must refuse."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.bhttp import (
    MAX_FIELDS,
    MAX_MESSAGE_SIZE,
    VARINT_MAX,
    Request,
    Response,
    decode_request,
    decode_response,
    decode_varint,
    encode_request,
    encode_response,
    encode_varint,
    pad,
    padded_size,
)
from protocol.errors import MalformedMessage

EXAMPLES = {
    e["name"]: e
    for e in json.loads(
        (
            Path(__file__).resolve().parent.parent / "assets" / "ohttp" / "bhttp-rfc9292.json"
        ).read_text()
    )["examples"]
}
H = bytes.fromhex


def fields(raw: list[list[str]]) -> tuple[tuple[str, str], ...]:
    return tuple((name, value) for name, value in raw)


# --- QUIC variable-length integers (RFC 9000 §16 and its Appendix A.1 examples) ------------------

VARINTS = [
    ("c2197c5eff14e88c", 151_288_809_941_952_652),
    ("9d7f3e7d", 494_878_333),
    ("7bbd", 15_293),
    ("25", 37),
]


@pytest.mark.parametrize(("encoded", "value"), VARINTS)
def test_rfc9000_varint_examples(encoded: str, value: int) -> None:
    assert decode_varint(H(encoded)) == (value, len(H(encoded)))
    assert encode_varint(value) == H(encoded)


def test_varint_non_shortest_is_accepted_when_decoding() -> None:
    assert decode_varint(H("4025")) == (37, 2)  # RFC 9000 Appendix A.1's own example


def test_varint_boundaries() -> None:
    for value, size in [(0, 1), (63, 1), (64, 2), (16383, 2), (16384, 4), (2**30, 8)]:
        assert len(encode_varint(value)) == size
        assert decode_varint(encode_varint(value)) == (value, size)
    assert decode_varint(encode_varint(VARINT_MAX)) == (VARINT_MAX, 8)
    for bad in (-1, VARINT_MAX + 1, True):
        with pytest.raises(MalformedMessage):
            encode_varint(bad)
    assert decode_varint(b"") is None
    assert decode_varint(b"\x40") is None
    assert decode_varint(b"\xc0" + bytes(6)) is None


# --- The RFC examples -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["rfc9292-a1-known-length-request", "rfc9458-a-request"], ids=lambda n: n
)
def test_request_examples_decode(name: str) -> None:
    e: dict[str, Any] = EXAMPLES[name]
    request = decode_request(H(e["encoded"]))
    assert request == Request(
        e["method"],
        e["scheme"],
        e["authority"],
        e["path"],
        fields(e["headers"]),
        H(e["content"]),
    )


def test_rfc9458_messages_are_encoded_byte_exactly() -> None:
    request = EXAMPLES["rfc9458-a-request"]
    assert encode_request(decode_request(H(request["encoded"]))) == H(request["encoded"])
    assert encode_response(Response(200)) == H(EXAMPLES["rfc9458-a-response"]["encoded"])
    assert decode_response(H("0140c8")) == Response(200)


def test_rfc9292_example_re_encodes_in_the_shortest_form() -> None:
    # The example spells out its empty content and trailer sections (00 00); RFC 9292 §3.8 lets an
    # encoder truncate them, and ours writes the shortest form.
    encoded = H(EXAMPLES["rfc9292-a1-known-length-request"]["encoded"])
    assert encode_request(decode_request(encoded)) == encoded[:-2]


# --- Round trips ----------------------------------------------------------------------------------


def test_request_round_trip_with_everything() -> None:
    request = Request(
        "POST",
        "https",
        "enclave.example",
        "/v1/infer?x=1",
        (("content-type", "application/cbor"), ("x-empty", ""), ("x-two", "a\tb c")),
        b"\x00\x01body",
        (("digest", "sha-256=:abc:"),),
    )
    assert decode_request(encode_request(request)) == request


def test_response_round_trip_and_truncation() -> None:
    for response in [
        Response(200),
        Response(404, (("content-type", "text/plain"),)),
        Response(200, (), b"content"),
        Response(599, (), b"", (("t", "v"),)),
    ]:
        encoded = encode_response(response)
        assert decode_response(encoded) == response
        assert decode_response(encoded + bytes(5)) == response  # zero padding


def test_padding_after_a_full_message_is_accepted() -> None:
    full = H("0140c8") + b"\x00\x00\x00"  # empty headers, content, trailers spelled out
    assert decode_response(full) == Response(200)
    assert decode_response(full + bytes(100)) == Response(200)


@pytest.mark.parametrize(
    ("size", "padded"),
    [
        (0, 512),
        (1, 512),
        (512, 512),
        (513, 1024),
        (65536, 65536),
        (65537, 131072),
        (200_000, 262144),
    ],
)
def test_pad_rounds_up_to_the_size_class(size: int, padded: int) -> None:
    assert padded_size(size) == padded
    assert pad(b"\x01" * size) == b"\x01" * size + bytes(padded - size)
    assert padded_size(padded) == padded  # padding twice changes nothing


def test_pad_never_exceeds_its_limit() -> None:
    assert padded_size(600, limit=700) == 700  # the class (1024) is capped at the limit
    with pytest.raises(MalformedMessage):
        pad(bytes(701), limit=700)


def test_padded_messages_decode_to_the_same_message() -> None:
    # the enclave pads every answer: the decoders must take the zeros for RFC 9292 §3.8 padding,
    # whichever sections the shortest encoding truncated
    responses = [Response(200), Response(200, (("content-type", "application/cbor"),), b"no")]
    for response in responses:
        assert decode_response(pad(encode_response(response))) == response
    request = Request("POST", "https", "", "/v1/infer", (), b"body")
    assert decode_request(pad(encode_request(request))) == request


def test_header_lookup() -> None:
    request = Request("GET", "https", "", "/", (("a", "1"), ("b", "2"), ("b", "3")))
    assert request.header("a") == "1"
    assert request.header("c") is None
    with pytest.raises(MalformedMessage, match="appears 2 times"):
        request.header("b")


# --- Malformed messages ---------------------------------------------------------------------------

GET = H(EXAMPLES["rfc9458-a-request"]["encoded"])  # 00 03 GET 05 https 0b example.com 01 /
OK = H("0140c8")


def request_with(headers: bytes = b"\x00", content: bytes = b"\x00") -> bytes:
    return GET + headers + content


BAD_REQUESTS: dict[str, bytes] = {
    "empty": b"",
    "response framing indicator": OK,
    "indeterminate-length request": H("02") + GET[1:],
    "unknown framing indicator": H("04") + GET[1:],
    "truncated varint": H("40"),
    "truncated method": H("0003474554"[:-2]),
    "method longer than the message": H("003f") + GET[2:],
    "empty method": H("0000") + GET[5:],
    "method with a space": H("0003474520") + GET[5:],
    "empty scheme": H("0003474554") + b"\x00" + GET[11:],
    "scheme with a digit first": H("0003474554053174747073") + GET[11:],
    "path with a space": GET[:-2] + b"\x02/ ",
    "non-ASCII path": GET[:-2] + b"\x02/\xff",
    "truncated inside control data": GET[:-1],
    "header section longer than the rest": request_with(b"\x05\x01a"),
    "empty field name": request_with(b"\x02\x00\x00"),
    "uppercase field name": request_with(b"\x04\x01A\x01b"),
    "field name with a colon (pseudo-field)": request_with(b"\x0b\x07:method\x03GET"),
    "field value with CR LF": request_with(b"\x06\x01a\x03b\r\n"),
    "field value with NUL": request_with(b"\x04\x01a\x01\x00"),
    "field value with leading space": request_with(b"\x05\x01a\x02 b"),
    "field value with trailing tab": request_with(b"\x05\x01a\x02b\t"),
    "field line cut short": request_with(b"\x02\x01a"),
    "content longer than the rest": request_with(b"\x00", b"\x05abc"),
    "non-zero byte after the trailers": request_with() + b"\x00\x01",
    "trailer section broken": request_with() + b"\x03\x01a\x05",
    "oversized": GET + bytes(MAX_MESSAGE_SIZE),
    "field section over the cap": request_with(H("80010001") + b"\x00" * 3),
    "too many fields": request_with(
        encode_varint(4 * (MAX_FIELDS + 1)) + b"\x01a\x01b" * (MAX_FIELDS + 1)
    ),
}


@pytest.mark.parametrize("data", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_rejects_malformed_request(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_request(data)


BAD_RESPONSES: dict[str, bytes] = {
    "empty": b"",
    "request framing indicator": GET,
    "indeterminate-length response": H("0340c8"),
    "informational response": H("014066"),
    "status below 100": H("01") + encode_varint(99),
    "status 600": H("01") + encode_varint(600),
    "truncated status": H("0140"),
    "content longer than the rest": OK + b"\x00\x09abc",
    "non-zero padding": OK + b"\x00\x00\x00\x07",
}


@pytest.mark.parametrize("data", BAD_RESPONSES.values(), ids=BAD_RESPONSES.keys())
def test_rejects_malformed_response(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_response(data)


def test_rejects_non_bytes() -> None:
    with pytest.raises(MalformedMessage):
        decode_request(bytearray(GET))  # type: ignore[arg-type]
    with pytest.raises(MalformedMessage):
        decode_response("0140c8")  # type: ignore[arg-type]


BAD_TO_ENCODE: dict[str, Request | Response] = {
    "lowercase-only names": Request("GET", "https", "", "/", (("Content-Type", "x"),)),
    "CR in a value": Request("GET", "https", "", "/", (("a", "b\r\nc: d"),)),
    "space in the method": Request("GE T", "https", "", "/"),
    "non-ASCII authority": Request("GET", "https", "é.example", "/"),
    "content not bytes": Request("GET", "https", "", "/", (), "text"),  # type: ignore[arg-type]
    "informational status": Response(103),
    "status out of range": Response(600),
    "field not a pair": Response(200, (("a",),)),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("message", BAD_TO_ENCODE.values(), ids=BAD_TO_ENCODE.keys())
def test_refuses_to_encode_invalid_messages(message: Request | Response) -> None:
    def encode() -> bytes:
        if isinstance(message, Request):
            return encode_request(message)
        return encode_response(message)

    with pytest.raises(MalformedMessage):
        encode()


# --- Properties -----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_decoders_raise_only_malformed_message(data: bytes) -> None:
    for decode in (decode_request, decode_response):
        for candidate in (data, b"\x00" + data, b"\x01" + data):
            with contextlib.suppress(MalformedMessage):
                decode(candidate)


TOKEN = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
VALUE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(TOKEN, VALUE), max_size=5),
    st.binary(max_size=50),
    st.lists(st.tuples(TOKEN, VALUE), max_size=3),
)
def test_request_round_trip_property(
    headers: list[tuple[str, str]], content: bytes, trailers: list[tuple[str, str]]
) -> None:
    request = Request("PUT", "https", "a.example", "/p", tuple(headers), content, tuple(trailers))
    assert decode_request(encode_request(request)) == request
