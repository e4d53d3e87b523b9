"""Oblivious HTTP (RFC 9458) and chunked OHTTP: the RFC vector, round trips for every AEAD, and the
attacks a hostile parent (or client, or server) could try on the bytes it carries."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import hpke
from protocol.bhttp import decode_varint, encode_varint
from protocol.errors import (
    ConfigError,
    DecapsulationError,
    MalformedMessage,
    OhttpError,
    UnknownKeyId,
)
from protocol.hpke import AeadId, KdfId
from protocol.ohttp import (
    DEFAULT_ALGORITHMS,
    MAX_MESSAGE_SIZE,
    MAX_REQUEST_CHUNKS,
    ChunkedResponseReader,
    ClientContext,
    KeyConfig,
    chunked_request_reader,
    decapsulate_request,
    encapsulate_chunked_request,
    encapsulate_request,
    encode_key_configs,
    generate_key_config,
    parse_key_configs,
)
from tests.assets.ohttp import generate_chunked

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "ohttp"
RFC = {k: v for k, v in json.loads((ASSETS / "ohttp-rfc9458.json").read_text()).items()}
H = bytes.fromhex

SK, KEY_CONFIG = generate_key_config(5)
HOSTILE = (MalformedMessage, UnknownKeyId, DecapsulationError)


def config_for(aead: AeadId, key_id: int = 5) -> tuple[bytes, bytes]:
    return SK, KeyConfig(key_id, hpke.public_key_of(SK), ((KdfId.HKDF_SHA256, aead),)).to_bytes()


# --- RFC 9458 Appendix A --------------------------------------------------------------------------


def test_rfc9458_key_config() -> None:
    config = KeyConfig.from_bytes(H(RFC["key_config"]))
    assert config.key_id == 1
    assert config.kem_id == 0x0020
    assert config.public_key == H(RFC["public_key"]) == hpke.public_key_of(H(RFC["private_key"]))
    assert config.algorithms == ((1, 1), (1, 3))
    assert config.to_bytes() == H(RFC["key_config"])


def test_rfc9458_request_is_reproduced_byte_exactly() -> None:
    encapsulated, _ = encapsulate_request(
        H(RFC["key_config"]),
        H(RFC["request"]),
        ephemeral_private_key=H(RFC["ephemeral_private_key"]),
    )
    assert encapsulated == H(RFC["encapsulated_request"])
    assert encapsulated[7:39] == H(RFC["ephemeral_public_key"])
    assert b"message/bhttp request\x00" + encapsulated[:7] == H(RFC["hpke_info"])


def test_rfc9458_request_decapsulates_and_response_is_reproduced() -> None:
    request, server = decapsulate_request(
        H(RFC["private_key"]), H(RFC["key_config"]), H(RFC["encapsulated_request"])
    )
    assert request == H(RFC["request"])
    assert server._context.export(b"message/bhttp response", 16) == H(RFC["exported_secret"])
    response = server.encapsulate_response(
        H(RFC["response"]), response_nonce=H(RFC["response_nonce"])
    )
    assert response == H(RFC["encapsulated_response"])


def test_rfc9458_response_decapsulates_at_the_client() -> None:
    _, client = encapsulate_request(
        H(RFC["key_config"]),
        H(RFC["request"]),
        ephemeral_private_key=H(RFC["ephemeral_private_key"]),
    )
    assert client.decapsulate_response(H(RFC["encapsulated_response"])) == H(RFC["response"])


# --- Key configurations ---------------------------------------------------------------------------


def test_generated_key_config_is_deterministic_given_the_key() -> None:
    sk, config = generate_key_config(9, private_key=H(RFC["private_key"]))
    assert sk == H(RFC["private_key"])
    parsed = KeyConfig.from_bytes(config)
    assert (parsed.key_id, parsed.public_key) == (9, H(RFC["public_key"]))
    assert parsed.algorithms == DEFAULT_ALGORITHMS
    assert parsed.suite().aead_id is AeadId.AES_256_GCM


def test_key_config_list_round_trip_and_skips_other_kems() -> None:
    a = KeyConfig.from_bytes(KEY_CONFIG)
    b = KeyConfig.from_bytes(H(RFC["key_config"]))
    p256 = (
        bytes([3]) + (0x0010).to_bytes(2, "big") + b"\x04" + bytes(64) + b"\x00\x04\x00\x01\x00\x01"
    )
    body = encode_key_configs([a, b])
    first = 2 + len(KEY_CONFIG)
    body_with_p256 = body[:first] + len(p256).to_bytes(2, "big") + p256 + body[first:]
    assert parse_key_configs(body) == [a, b]
    assert parse_key_configs(body_with_p256) == [a, b]


def test_client_skips_unsupported_symmetric_algorithms() -> None:
    config = KeyConfig(2, hpke.public_key_of(SK), ((3, 1), (1, 9), (1, 3))).to_bytes()
    _, client = encapsulate_request(config, b"x")
    assert client._context.suite.aead_id is AeadId.CHACHA20_POLY1305


BAD_KEY_CONFIGS: dict[str, bytes] = {
    "empty": b"",
    "truncated header": b"\x01\x00",
    "other kem": b"\x01\x00\x10" + bytes(32) + b"\x00\x04\x00\x01\x00\x01",
    "truncated public key": b"\x01\x00\x20" + bytes(31),
    "no algorithms length": b"\x01\x00\x20" + bytes(32),
    "zero algorithms": b"\x01\x00\x20" + bytes(32) + b"\x00\x00",
    "algorithms not a multiple of 4": b"\x01\x00\x20" + bytes(32) + b"\x00\x03\x00\x01\x00",
    "truncated algorithms": b"\x01\x00\x20" + bytes(32) + b"\x00\x08\x00\x01\x00\x01",
    "too many algorithms": b"\x01\x00\x20" + bytes(32) + b"\x01\x04" + b"\x00\x01\x00\x01" * 65,
    "trailing byte": KEY_CONFIG + b"\x00",
}


@pytest.mark.parametrize("data", BAD_KEY_CONFIGS.values(), ids=BAD_KEY_CONFIGS.keys())
def test_rejects_malformed_key_config(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        KeyConfig.from_bytes(data)


BAD_KEY_LISTS: dict[str, bytes] = {
    "empty": b"",
    "only another kem": b"\x00\x0a\x01\x00\x10" + bytes(7),
    "length beyond the end": b"\x00\x40" + KEY_CONFIG,
    "odd byte": encode_key_configs([KeyConfig.from_bytes(KEY_CONFIG)]) + b"\x00",
    "too many configs": encode_key_configs([KeyConfig.from_bytes(KEY_CONFIG)] * 33),
}


@pytest.mark.parametrize("data", BAD_KEY_LISTS.values(), ids=BAD_KEY_LISTS.keys())
def test_rejects_malformed_key_config_list(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        parse_key_configs(data)


def test_client_refuses_config_without_a_supported_pair() -> None:
    config = KeyConfig(2, hpke.public_key_of(SK), ((1, 0xFFFF),)).to_bytes()
    with pytest.raises(MalformedMessage, match="no supported"):
        encapsulate_request(config, b"x")


def test_server_refuses_a_private_key_that_is_not_its_configs() -> None:
    other, _ = hpke.generate_key_pair()
    encapsulated, _ = encapsulate_request(KEY_CONFIG, b"x")
    with pytest.raises(ConfigError):
        decapsulate_request(other, KEY_CONFIG, encapsulated)


# --- Round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("aead", list(AeadId), ids=lambda a: a.name)
def test_round_trip(aead: AeadId) -> None:
    sk, config = config_for(aead)
    encapsulated, client = encapsulate_request(config, b"request bytes")
    assert encapsulated[5:7] == aead.to_bytes(2, "big")
    request, server = decapsulate_request(sk, config, encapsulated)
    assert request == b"request bytes"
    response = server.encapsulate_response(b"response bytes")
    assert len(response) == max(server.suite.nn, server.suite.nk) + len(b"response bytes") + 16
    assert client.decapsulate_response(response) == b"response bytes"


@pytest.mark.parametrize("aead", list(AeadId), ids=lambda a: a.name)
def test_chunked_round_trip(aead: AeadId) -> None:
    sk, config = config_for(aead)
    writer, client = encapsulate_chunked_request(config)
    stream = writer.chunk(b"a") + writer.chunk(b"") + writer.chunk(b"bc" * 100) + writer.final(b"d")
    reader = chunked_request_reader(sk, config)
    pieces = [p for i in range(0, len(stream), 7) for p in reader.feed(stream[i : i + 7])]
    assert not reader.finished
    pieces.append(reader.close())
    assert reader.finished
    assert pieces == [b"a", b"", b"bc" * 100, b"d"]

    response_writer = reader.context.chunked_response()
    out = response_writer.chunk(b"x") + response_writer.chunk(b"yz") + response_writer.final()
    response_reader = client.chunked_response_reader()
    got = [p for byte in out for p in response_reader.feed(bytes([byte]))]
    got.append(response_reader.close())
    assert got == [b"x", b"yz", b""]
    assert response_reader.finished


def test_chunked_vectors_regenerate_identically() -> None:
    assert (ASSETS / "chunked-synthetic.json").read_text() == generate_chunked.render()


def test_chunked_vectors_open() -> None:
    v = json.loads((ASSETS / "chunked-synthetic.json").read_text())
    reader = chunked_request_reader(H(v["private_key"]), H(v["key_config"]))
    got = reader.feed(b"".join(H(p) for p in v["encapsulated_request_parts"]))
    assert [*got, reader.close()] == [H(c) for c in v["request_chunks"]] + [H(v["request_final"])]


def test_plain_and_chunked_are_not_interchangeable() -> None:
    encapsulated, client = encapsulate_request(KEY_CONFIG, b"x")
    _, server = decapsulate_request(SK, KEY_CONFIG, encapsulated)
    with pytest.raises(ConfigError):
        server.chunked_response()
    with pytest.raises(ConfigError):
        client.chunked_response_reader()
    # A plain request fed to a chunked reader fails: its ciphertext read as chunk framing is
    # malformed, or the chunk does not authenticate (its HPKE info differs), depending on its bytes.
    reader = chunked_request_reader(SK, KEY_CONFIG)

    def read_all() -> None:
        reader.feed(encapsulated)
        reader.close()

    with pytest.raises((DecapsulationError, MalformedMessage)):
        read_all()
    assert not reader.finished


# --- Hostile requests -----------------------------------------------------------------------------


def good_request() -> bytes:
    return encapsulate_request(KEY_CONFIG, b"GET / please")[0]


def flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x80
    return bytes(out)


def with_suite(data: bytes, kdf: int, aead: int) -> bytes:
    return data[:3] + kdf.to_bytes(2, "big") + aead.to_bytes(2, "big") + data[7:]


REQ = good_request()
HOSTILE_REQUESTS: dict[str, tuple[bytes, type[OhttpError]]] = {
    "wrong key id": (bytes([6]) + REQ[1:], UnknownKeyId),
    "empty": (b"", MalformedMessage),
    "truncated header": (REQ[:6], MalformedMessage),
    "truncated enc": (REQ[: 7 + 31], MalformedMessage),
    "no ciphertext": (REQ[:39], MalformedMessage),
    "ciphertext shorter than the tag": (REQ[: 39 + 15], MalformedMessage),
    "other kem": (REQ[:1] + b"\x00\x10" + REQ[3:], MalformedMessage),
    "unsupported aead": (with_suite(REQ, 1, 0x0004), MalformedMessage),
    "suite swapped in the header": (with_suite(REQ, 1, AeadId.AES_128_GCM), DecapsulationError),
    "flipped enc": (flip(REQ, 10), DecapsulationError),
    "small-order enc": (REQ[:7] + bytes(32) + REQ[39:], DecapsulationError),
    "flipped ciphertext": (flip(REQ, 45), DecapsulationError),
    "flipped tag": (flip(REQ, len(REQ) - 1), DecapsulationError),
    "truncated tag": (REQ[:-1], DecapsulationError),
    "appended byte": (REQ + b"\x00", DecapsulationError),
    "oversized": (REQ + bytes(MAX_MESSAGE_SIZE), MalformedMessage),
}


@pytest.mark.parametrize(("data", "error"), HOSTILE_REQUESTS.values(), ids=HOSTILE_REQUESTS.keys())
def test_rejects_hostile_request(data: bytes, error: type[OhttpError]) -> None:
    with pytest.raises(error) as caught:
        decapsulate_request(SK, KEY_CONFIG, data)
    assert type(caught.value) is error
    if error is DecapsulationError:  # one message whatever failed: no oracle
        assert str(caught.value) == "request: decryption failed"


def test_rejects_request_for_a_pair_the_config_does_not_offer() -> None:
    sk, aes128_only = config_for(AeadId.AES_128_GCM)
    chacha, _ = encapsulate_request(config_for(AeadId.CHACHA20_POLY1305)[1], b"x")
    with pytest.raises(MalformedMessage, match="not in the key configuration"):
        decapsulate_request(sk, aes128_only, chacha)


def test_rejects_request_not_bytes() -> None:
    with pytest.raises(MalformedMessage):
        decapsulate_request(SK, KEY_CONFIG, bytearray(REQ))  # type: ignore[arg-type]


# --- Hostile responses ----------------------------------------------------------------------------


def exchange() -> tuple[ClientContext, bytes]:
    encapsulated, client = encapsulate_request(KEY_CONFIG, b"q")
    _, server = decapsulate_request(SK, KEY_CONFIG, encapsulated)
    return client, server.encapsulate_response(b"the completion" * 4)


CLIENT, RESP = exchange()
OTHER_CLIENT, OTHER_RESP = exchange()
HOSTILE_RESPONSES: dict[str, tuple[bytes, type[OhttpError]]] = {
    "empty": (b"", MalformedMessage),
    "shorter than nonce and tag": (RESP[: 32 + 15], MalformedMessage),
    "nonce of the AES-128 length": (RESP[16:], DecapsulationError),
    "flipped nonce": (flip(RESP, 0), DecapsulationError),
    "flipped ciphertext": (flip(RESP, 33), DecapsulationError),
    "flipped tag": (flip(RESP, len(RESP) - 1), DecapsulationError),
    "truncated": (RESP[:-1], DecapsulationError),
    "extended": (RESP + b"\x00", DecapsulationError),
    "response to another request": (OTHER_RESP, DecapsulationError),
    "oversized": (bytes(MAX_MESSAGE_SIZE + 1), MalformedMessage),
}


@pytest.mark.parametrize(
    ("data", "error"), HOSTILE_RESPONSES.values(), ids=HOSTILE_RESPONSES.keys()
)
def test_rejects_hostile_response(data: bytes, error: type[OhttpError]) -> None:
    with pytest.raises(error) as caught:
        CLIENT.decapsulate_response(data)
    assert type(caught.value) is error
    if error is DecapsulationError:
        assert str(caught.value) == "response: decryption failed"


def test_response_nonce_must_have_the_suite_length() -> None:
    encapsulated, _ = encapsulate_request(KEY_CONFIG, b"q")
    _, server = decapsulate_request(SK, KEY_CONFIG, encapsulated)
    for size in (0, 16, 31, 33):
        with pytest.raises(ConfigError):
            server.encapsulate_response(b"r", response_nonce=bytes(size))


# --- Hostile chunked streams ----------------------------------------------------------------------


def split_chunks(stream: bytes, prefix: int) -> tuple[bytes, list[bytes], bytes]:
    """(prefix, [framed non-final chunks], framed final chunk) of a chunked stream."""
    pos, chunks = prefix, []
    while True:
        decoded = decode_varint(stream, pos)
        assert decoded is not None
        length, start = decoded
        if length == 0:
            return stream[:prefix], chunks, stream[pos:]
        chunks.append(stream[pos : start + length])
        pos = start + length


def chunked_response() -> tuple[Callable[[], ChunkedResponseReader], bytes]:
    writer, client = encapsulate_chunked_request(KEY_CONFIG)
    stream = writer.final(b"req")
    reader = chunked_request_reader(SK, KEY_CONFIG)
    reader.feed(stream)
    reader.close()
    out = reader.context.chunked_response()
    response = out.chunk(b"one") + out.chunk(b"two") + out.chunk(b"three") + out.final(b"end")
    return client.chunked_response_reader, response


NEW_READER, CHUNKED = chunked_response()
HEAD, CHUNKS, FINAL = split_chunks(CHUNKED, 32)
REFRAMED_FINAL = encode_varint(len(FINAL) - 1) + FINAL[1:]
HOSTILE_STREAMS: dict[str, tuple[bytes, type[OhttpError]]] = {
    "empty": (b"", DecapsulationError),
    "only the nonce": (HEAD, DecapsulationError),
    "truncated before the final chunk": (HEAD + b"".join(CHUNKS), DecapsulationError),
    "truncated inside a chunk": (HEAD + CHUNKS[0][:-3], DecapsulationError),
    "truncated inside the final chunk": (CHUNKED[:-1], DecapsulationError),
    "final indicator without a chunk": (HEAD + b"".join(CHUNKS) + b"\x00", DecapsulationError),
    "chunks reordered": (HEAD + CHUNKS[1] + CHUNKS[0] + CHUNKS[2] + FINAL, DecapsulationError),
    "chunk dropped": (HEAD + CHUNKS[0] + CHUNKS[2] + FINAL, DecapsulationError),
    "chunk repeated": (HEAD + CHUNKS[0] + CHUNKS[0] + CHUNKS[1] + FINAL, DecapsulationError),
    "final chunk framed as non-final": (
        HEAD + b"".join(CHUNKS) + REFRAMED_FINAL + b"\x00" + FINAL[1:],
        DecapsulationError,
    ),
    "non-final chunk framed as final": (HEAD + b"\x00" + CHUNKS[0][1:], DecapsulationError),
    "flipped nonce": (flip(CHUNKED, 3), DecapsulationError),
    "flipped chunk": (flip(CHUNKED, 40), DecapsulationError),
    "flipped final chunk": (flip(CHUNKED, len(CHUNKED) - 1), DecapsulationError),
    "bytes after the final chunk": (CHUNKED + b"\x00", DecapsulationError),
    "chunk shorter than a tag": (HEAD + b"\x05" + bytes(5), MalformedMessage),
    "chunk larger than the cap": (HEAD + encode_varint(MAX_MESSAGE_SIZE + 1), MalformedMessage),
}


@pytest.mark.parametrize(("data", "error"), HOSTILE_STREAMS.values(), ids=HOSTILE_STREAMS.keys())
def test_rejects_hostile_chunked_response(data: bytes, error: type[OhttpError]) -> None:
    reader = NEW_READER()

    def run() -> None:
        for i in range(0, len(data), 11):
            reader.feed(data[i : i + 11])
        reader.close()

    with pytest.raises(error):
        run()
    assert not reader.finished


def test_intact_chunked_response_opens() -> None:
    reader = NEW_READER()
    assert [*reader.feed(CHUNKED), reader.close()] == [b"one", b"two", b"three", b"end"]


def test_chunked_reader_refuses_use_after_an_error_and_after_the_end() -> None:
    reader = NEW_READER()
    with pytest.raises(DecapsulationError):
        reader.feed(flip(CHUNKED, 40))
    with pytest.raises(ConfigError):
        reader.feed(b"")
    done = NEW_READER()
    done.feed(CHUNKED)
    done.close()
    with pytest.raises(MalformedMessage):
        done.feed(b"\x00")


def test_chunked_stream_size_cap() -> None:
    writer, _ = encapsulate_chunked_request(KEY_CONFIG)
    stream = writer.chunk(bytes(100)) + writer.final()
    reader = chunked_request_reader(SK, KEY_CONFIG, max_size=len(stream) - 1)
    with pytest.raises(MalformedMessage):
        reader.feed(stream)


def test_rejects_chunked_request_of_a_million_empty_chunks() -> None:
    # the reviewer's stream: 16 MiB of empty chunks cost 20 s of AEAD opens; now the reader stops
    # at chunk 1025, before opening it (the rest need not even be valid ciphertext)
    writer, _ = encapsulate_chunked_request(KEY_CONFIG)
    head = b"".join(writer.chunk(b"") for _ in range(MAX_REQUEST_CHUNKS))
    stream = head + (encode_varint(16) + bytes(16)) * 1_000_000 + writer.final(b"")
    reader = chunked_request_reader(SK, KEY_CONFIG)
    started = time.perf_counter()
    with pytest.raises(MalformedMessage, match=f"more than {MAX_REQUEST_CHUNKS} chunks"):
        reader.feed(stream)
    assert time.perf_counter() - started < 1.0


def test_chunked_request_of_max_chunks_is_accepted() -> None:
    writer, _ = encapsulate_chunked_request(KEY_CONFIG)
    parts = [writer.chunk(b"x") for _ in range(MAX_REQUEST_CHUNKS - 1)]
    stream = b"".join(parts) + writer.final(b"end")
    reader = chunked_request_reader(SK, KEY_CONFIG)
    assert (
        b"".join(reader.feed(stream)) + reader.close() == b"x" * (MAX_REQUEST_CHUNKS - 1) + b"end"
    )
    # one more (the final chunk counts too) is refused, and the cap can be lowered
    writer, _ = encapsulate_chunked_request(KEY_CONFIG)
    small = chunked_request_reader(SK, KEY_CONFIG, max_chunks=2)
    with pytest.raises(MalformedMessage):
        small.feed(writer.chunk(b"a") + writer.chunk(b"b") + writer.final(b"c"))


def test_server_context_exposes_the_requests_encapsulated_key() -> None:
    # what the enclave keeps to refuse replays: the enc that travelled in clear after the header
    encapsulated, _ = encapsulate_request(KEY_CONFIG, b"request")
    _, context = decapsulate_request(SK, KEY_CONFIG, encapsulated)
    assert context.enc == encapsulated[7 : 7 + 32]
    writer, _ = encapsulate_chunked_request(KEY_CONFIG)
    stream = writer.final(b"request")
    reader = chunked_request_reader(SK, KEY_CONFIG)
    reader.feed(stream)
    reader.close()
    assert reader.context.enc == stream[7 : 7 + 32]


def test_chunked_request_rejects_wrong_key_id_and_hides_the_context_until_complete() -> None:
    _, other_config = config_for(AeadId.AES_128_GCM, key_id=6)
    writer, _ = encapsulate_chunked_request(other_config)
    with pytest.raises(UnknownKeyId):
        chunked_request_reader(SK, KEY_CONFIG).feed(writer.chunk(b"x"))
    writer, _ = encapsulate_chunked_request(KEY_CONFIG)
    reader = chunked_request_reader(SK, KEY_CONFIG)
    reader.feed(writer.chunk(b"part"))
    with pytest.raises(ConfigError):
        _ = reader.context
    with pytest.raises(DecapsulationError):
        reader.close()


def test_writers_refuse_output_after_final() -> None:
    writer, _ = encapsulate_chunked_request(KEY_CONFIG)
    writer.final(b"")
    with pytest.raises(ConfigError):
        writer.chunk(b"more")


# --- Properties: arbitrary bytes raise only our own errors ---------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=128))
def test_decapsulate_request_raises_only_its_errors(data: bytes) -> None:
    # Keep the header valid half the time, so that the deeper checks are reached.
    for candidate in (data, REQ[:7] + data):
        with contextlib.suppress(*HOSTILE):
            decapsulate_request(SK, KEY_CONFIG, candidate)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=96))
def test_decapsulate_response_and_key_configs_raise_only_their_errors(data: bytes) -> None:
    for parse in (CLIENT.decapsulate_response, KeyConfig.from_bytes, parse_key_configs):
        with contextlib.suppress(MalformedMessage, DecapsulationError):
            parse(data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=6), st.booleans())
def test_chunked_readers_raise_only_their_errors(parts: list[bytes], valid_head: bool) -> None:
    head = HEAD if valid_head else b""
    reader = NEW_READER()
    request_reader = chunked_request_reader(SK, KEY_CONFIG)
    for r, first in ((reader, head), (request_reader, REQ[:39] if valid_head else b"")):
        try:
            for part in [first, *parts]:
                r.feed(part)
            r.close()
        except HOSTILE:
            pass
