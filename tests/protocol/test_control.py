"""Payloads of the control connection (protocol/control.py): round trips, and hostile decodes that
raise only FrameError, naming the field and never quoting a secret."""

from __future__ import annotations

import contextlib
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.control import (
    ERROR_CODES,
    MAX_INFER_REQUEST,
    Credentials,
    Health,
    InferMode,
    InferRequest,
    check_nonce,
)
from protocol.errors import FrameError
from protocol.frames import FrameType

HEALTH = {
    "state": "ready",
    "step": 6,
    "steps": 6,
    "name": "ready",
    "error": "",
    "key_id": 7,
    "active": 1,
    "served": 12,
}
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
TOKEN = "IQoJb3JpZ2luX2VjEXAMPLETOKEN" * 20
CREDENTIALS = {
    "access_key_id": "ASIAEXAMPLEEXAMPLE12",
    "secret_access_key": SECRET,
    "session_token": TOKEN,
    "expiration": "2030-01-01T00:00:00Z",
}


def encoded(value: Any) -> bytes:
    return bytes(cbor2.dumps(value, canonical=True))


# --- Health ---------------------------------------------------------------------------------------


def test_health_round_trips_deterministically() -> None:
    health = Health(**HEALTH)
    assert health.encode() == encoded(HEALTH)
    assert Health.decode(health.encode()) == health
    assert health.ready
    frame = health.frame(9)
    assert (frame.type, frame.stream_id) == (FrameType.HEALTH_PONG, 9)


def test_failed_health_carries_its_error_code() -> None:
    failed = Health("failed", 3, 6, "key release and unlock", error="kms_unavailable")
    assert Health.decode(failed.encode()) == failed
    assert not failed.ready


BAD_HEALTH = {
    "unknown_state": {"state": "sleeping"},
    "step_beyond_steps": {"step": 7},
    "bool_step": {"step": True},
    "negative_active": {"active": -1},
    "served_over_u32": {"served": 2**32},
    "key_id_over_255": {"key_id": 256},
    "upper_case_name": {"name": "Ready"},
    "empty_name": {"name": ""},
    "error_without_failure": {"error": "internal"},
    "failure_without_error": {"state": "failed"},
    "error_code_with_spaces": {"state": "failed", "error": "bad code"},
    "falsy_error_of_another_type": {"error": 0},
    "null_error": {"error": None},
    "bytes_name": {"name": b"ready"},
}


@pytest.mark.parametrize("change", BAD_HEALTH.values(), ids=BAD_HEALTH.keys())
def test_rejects_health_breaking_a_rule(change: dict[str, Any]) -> None:
    with pytest.raises(FrameError):
        Health.decode(encoded({**HEALTH, **change}))


HOSTILE_MAPS = {
    "not_a_map": encoded([1, 2]),
    "missing_key": encoded({k: v for k, v in HEALTH.items() if k != "served"}),
    "unknown_key": encoded({**HEALTH, "extra": 1}),
    "trailing_bytes": encoded(HEALTH) + b"\x00",
    "tagged_value": encoded({**HEALTH, "step": cbor2.CBORTag(2, b"\x06")}),
    "float_value": encoded({**HEALTH, "step": 6.0}),
    "nested_map": encoded({**HEALTH, "name": {"a": 1}}),
    "oversized": encoded({**HEALTH, "name": "a" * 5000}),
    "empty": b"",
    "truncated": encoded(HEALTH)[:-1],
}


@pytest.mark.parametrize("payload", HOSTILE_MAPS.values(), ids=HOSTILE_MAPS.keys())
def test_rejects_hostile_health_payload(payload: bytes) -> None:
    with pytest.raises(FrameError):
        Health.decode(payload)


def test_rejects_health_map_with_duplicate_keys() -> None:
    body = encoded(HEALTH)
    # a map of 9 pairs whose last key repeats the first one ("name", smallest in canonical order)
    duplicate = bytes([0xA9]) + body[1:] + encoded("name") + encoded("ready")
    with pytest.raises(FrameError):
        Health.decode(duplicate)


# --- Credentials ----------------------------------------------------------------------------------


def test_credentials_round_trip_on_stream_zero() -> None:
    credentials = Credentials(**CREDENTIALS)
    assert Credentials.decode(credentials.encode()) == credentials
    frame = credentials.frame()
    assert (frame.type, frame.stream_id) == (FrameType.CREDENTIALS, 0)
    assert Credentials.decode(encoded({**CREDENTIALS, "session_token": ""})).session_token == ""


def test_credentials_never_show_in_repr() -> None:
    text = repr(Credentials(**CREDENTIALS))
    for secret in CREDENTIALS.values():
        if secret != CREDENTIALS["expiration"]:
            assert secret not in text


BAD_CREDENTIALS = {
    "lower_case_key_id": {"access_key_id": "akiaexample"},
    "short_key_id": {"access_key_id": "AKI"},
    "empty_secret": {"secret_access_key": ""},
    "secret_with_space": {"secret_access_key": SECRET[:10] + " " + SECRET[10:]},
    "secret_with_newline": {"secret_access_key": SECRET + "\n"},
    "token_too_long": {"session_token": "A" * 2049},
    "integer_token": {"session_token": 5},
    "null_expiration": {"expiration": None},
}


@pytest.mark.parametrize("change", BAD_CREDENTIALS.values(), ids=BAD_CREDENTIALS.keys())
def test_rejects_credentials_without_quoting_them(change: dict[str, Any]) -> None:
    with pytest.raises(FrameError) as caught:
        Credentials.decode(encoded({**CREDENTIALS, **change}))
    message = str(caught.value)
    assert SECRET[:12] not in message
    assert TOKEN[:12] not in message
    for value in change.values():
        if isinstance(value, str) and len(value) > 4:
            assert value not in message


@pytest.mark.parametrize("payload", HOSTILE_MAPS.values(), ids=HOSTILE_MAPS.keys())
def test_rejects_hostile_credentials_payload(payload: bytes) -> None:
    with pytest.raises(FrameError):
        Credentials.decode(payload)


# --- Nonces and inference requests ------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 32, 64])
def test_accepts_nonce_of_16_to_64_bytes(size: int) -> None:
    assert check_nonce(bytes(size)) == bytes(size)


@pytest.mark.parametrize("nonce", [b"", bytes(15), bytes(65), bytearray(32), "a" * 32, None])
def test_rejects_nonce_of_wrong_size_or_type(nonce: object) -> None:
    with pytest.raises(FrameError):
        check_nonce(nonce)


@pytest.mark.parametrize("mode", list(InferMode))
def test_infer_request_round_trips(mode: InferMode) -> None:
    request = InferRequest(mode, b"\x01ciphertext")
    assert request.encode() == bytes([mode]) + b"\x01ciphertext"
    assert InferRequest.decode(request.encode()) == request
    frame = request.frame(5)
    assert (frame.type, frame.stream_id, frame.payload) == (
        FrameType.INFER_REQUEST,
        5,
        request.encode(),
    )


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00", b"\x02request", b"\xffrequest", bytes(1) + bytes(MAX_INFER_REQUEST + 1)],
    ids=["empty", "mode_only", "mode_2", "mode_255", "oversized_request"],
)
def test_rejects_malformed_infer_request(payload: bytes) -> None:
    with pytest.raises(FrameError):
        InferRequest.decode(payload)


def test_infer_request_hides_the_message_in_repr() -> None:
    assert "ciphertext" not in repr(InferRequest(InferMode.SINGLE, b"ciphertext"))


@pytest.mark.parametrize(
    ("media_type", "mode"),
    [
        ("message/ohttp-req", InferMode.SINGLE),
        ("Message/OHTTP-Req; charset=x", InferMode.SINGLE),
        ("message/ohttp-chunked-req", InferMode.CHUNKED),
    ],
)
def test_mode_follows_the_request_media_type(media_type: str, mode: InferMode) -> None:
    assert InferMode.for_media_type(media_type) is mode
    assert mode.request_media_type in media_type.lower()
    assert mode.response_media_type.endswith("-res")


@pytest.mark.parametrize("media_type", ["application/json", "message/ohttp-res", ""])
def test_rejects_other_media_types(media_type: str) -> None:
    with pytest.raises(FrameError):
        InferMode.for_media_type(media_type)


def test_error_codes_are_the_contracts() -> None:
    codes = {"unknown_key", "malformed", "not_ready", "busy", "too_large", "internal"}
    assert codes == ERROR_CODES


@given(st.binary(max_size=300))
def test_decoders_raise_only_frame_error_on_arbitrary_bytes(data: bytes) -> None:
    for decode in (Health.decode, Credentials.decode, InferRequest.decode, check_nonce):
        with contextlib.suppress(FrameError):
            decode(data)
