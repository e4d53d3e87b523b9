"""Payloads of the control connection between the parent and the enclave (docs/request-path.md).

One connection from the parent to the enclave's control address carries health, credentials,
attestation and inference, multiplexed by ``stream_id``. This module holds the payload layouts and
their strict decoders; the frame header is :mod:`protocol.frames`.

=====================  ==========  ================================================================
frame                  direction   payload
=====================  ==========  ================================================================
HEALTH_PING            P→E         empty
HEALTH_PONG            E→P         :class:`Health` (CBOR map)
CREDENTIALS            P→E         :class:`Credentials` (CBOR map), stream 0, no answer
ATTESTATION_REQUEST    P→E         the consumer's nonce, raw, 16..64 bytes
ATTESTATION_RESPONSE   E→P         the attestation document, raw; its ``user_data`` is
                                   :class:`UserData`
INFER_REQUEST          P→E         mode u8 ‖ the encapsulated request (:class:`InferRequest`)
INFER_RESPONSE_CHUNK   E→P         bytes for the consumer's response body, verbatim
INFER_RESPONSE_END     E→P         empty
ERROR                  E→P         :class:`~protocol.frames.ErrorPayload` with a code of
                                   :data:`ERROR_CODES`
=====================  ==========  ================================================================

Every decoder raises only :class:`~protocol.errors.FrameError`, naming the field and never quoting
its value (credentials are secrets; the rest is public, but a rule is simpler than a judgement).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Final

from protocol._cbor import CborRejected, canonical_dumps, strict_loads
from protocol.errors import FrameError
from protocol.frames import Frame, FrameType
from protocol.ohttp import (
    MEDIA_TYPE_CHUNKED_REQUEST,
    MEDIA_TYPE_CHUNKED_RESPONSE,
    MEDIA_TYPE_REQUEST,
    MEDIA_TYPE_RESPONSE,
)

__all__ = [
    "ERROR_CODES",
    "HEALTH_STATES",
    "MAX_INFER_REQUEST",
    "MAX_MODEL_ID",
    "MAX_NONCE",
    "MIN_NONCE",
    "USER_DATA_VERSION",
    "Credentials",
    "Health",
    "InferMode",
    "InferRequest",
    "UserData",
    "check_nonce",
]

MIN_NONCE: Final = 16
MAX_NONCE: Final = 64
MAX_INFER_REQUEST: Final = 16 * 1024 * 1024  # the encapsulated request, as the bridge accepts it
MAX_CONTROL_PAYLOAD: Final = 4096  # health and credentials maps, checked before decoding
_MAX_NAME: Final = 64
_MAX_CREDENTIAL: Final = 2048  # session tokens run to ~1.3 KB
_ACCESS_KEY_ID = re.compile(r"[A-Z0-9]{4,128}", re.ASCII)
_NAME = re.compile(r"[a-z][a-z0-9 _-]*", re.ASCII)
_CODE = re.compile(r"[a-z][a-z0-9_]*", re.ASCII)
_PRINTABLE = re.compile(r"[\x21-\x7e]*", re.ASCII)
_U32_MAX: Final = 0xFFFF_FFFF

HEALTH_STATES: Final = ("booting", "ready", "failed")

ERROR_CODES: Final = frozenset(
    {"unknown_key", "malformed", "not_ready", "busy", "too_large", "internal"}
)
"""The codes the enclave puts in an ERROR frame on a consumer's stream (docs/request-path.md)."""


def _decode_map(payload: object, kind: str, keys: frozenset[str]) -> dict[str, object]:
    if type(payload) is not bytes:
        raise FrameError(f"{kind} payload must be bytes")
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise FrameError(f"{kind} payload is {len(payload)} bytes; the maximum is 4096")
    try:
        value = strict_loads(payload, max_depth=1)
    except CborRejected as exc:
        raise FrameError(f"{kind} payload: {exc}") from None
    if not isinstance(value, dict):
        raise FrameError(f"{kind} payload must be a CBOR map")
    missing = keys - value.keys()
    if missing:
        raise FrameError(f"{kind} payload lacks {', '.join(sorted(missing))}")
    if value.keys() - keys:
        raise FrameError(f"{kind} payload has {len(value.keys() - keys)} unknown field(s)")
    return value


def _text(value: object, what: str, limit: int, pattern: re.Pattern[str] | None = None) -> str:
    if type(value) is not str:
        raise FrameError(f"{what} must be a text string")
    if len(value) > limit:
        raise FrameError(f"{what} is longer than {limit} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise FrameError(f"{what} must match {pattern.pattern}")
    return value


def _u32(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= _U32_MAX:
        raise FrameError(f"{what} must be an unsigned integer (u32)")
    return value


# --- Health ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Health:
    """HEALTH_PONG: where the enclave's boot stands, and counters (never content)."""

    state: str  # one of HEALTH_STATES
    step: int  # the boot step reached (1-based), or ``steps`` when ready
    steps: int
    name: str  # the step's name ("key release and unlock")
    error: str = ""  # an error code when failed, else ""
    key_id: int = 0  # the OHTTP key id when ready
    active: int = 0  # inference requests in progress
    served: int = 0  # inference requests answered since boot

    def __post_init__(self) -> None:
        if self.state not in HEALTH_STATES:
            raise FrameError(f"health state must be one of {', '.join(HEALTH_STATES)}")
        _u32(self.step, "health step")
        _u32(self.steps, "health steps")
        if self.step > self.steps:
            raise FrameError("health step must not exceed steps")
        _text(self.name, "health name", _MAX_NAME, _NAME)
        _text(self.error, "health error", _MAX_NAME)  # the type, also when empty
        if self.error:
            _text(self.error, "health error", _MAX_NAME, _CODE)
        if type(self.key_id) is not int or not 0 <= self.key_id <= 255:
            raise FrameError("health key_id must be 0..255")
        _u32(self.active, "health active")
        _u32(self.served, "health served")
        if (self.state == "failed") != bool(self.error):
            raise FrameError("health error is set exactly when the state is failed")

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def encode(self) -> bytes:
        return canonical_dumps(
            {
                "state": self.state,
                "step": self.step,
                "steps": self.steps,
                "name": self.name,
                "error": self.error,
                "key_id": self.key_id,
                "active": self.active,
                "served": self.served,
            }
        )

    @classmethod
    def decode(cls, payload: bytes) -> Health:
        value = _decode_map(payload, "HEALTH_PONG", _HEALTH_KEYS)
        return cls(**value)  # type: ignore[arg-type]  # every field is checked in __post_init__

    def frame(self, stream_id: int) -> Frame:
        return Frame(FrameType.HEALTH_PONG, stream_id, self.encode())


_HEALTH_KEYS: Final = frozenset(
    {"state", "step", "steps", "name", "error", "key_id", "active", "served"}
)


# --- Credentials ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """CREDENTIALS: the parent role's temporary AWS credentials, for the enclave's KMS calls.

    The enclave has no instance metadata service; the parent forwards what it has. These are the
    parent's own credentials (the key policy still demands an attestation document), but they are
    secrets all the same: never in ``repr``, logs or error messages.
    """

    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    session_token: str = field(default="", repr=False)
    expiration: str = ""  # ISO 8601, "" when unknown

    def __post_init__(self) -> None:
        _text(self.access_key_id, "access_key_id", 128, _ACCESS_KEY_ID)
        _text(self.secret_access_key, "secret_access_key", _MAX_CREDENTIAL, _PRINTABLE)
        if not self.secret_access_key:
            raise FrameError("secret_access_key must not be empty")
        _text(self.session_token, "session_token", _MAX_CREDENTIAL, _PRINTABLE)
        _text(self.expiration, "expiration", _MAX_NAME, _PRINTABLE)

    def encode(self) -> bytes:
        return canonical_dumps(
            {
                "access_key_id": self.access_key_id,
                "secret_access_key": self.secret_access_key,
                "session_token": self.session_token,
                "expiration": self.expiration,
            }
        )

    @classmethod
    def decode(cls, payload: bytes) -> Credentials:
        value = _decode_map(payload, "CREDENTIALS", _CREDENTIAL_KEYS)
        return cls(**value)  # type: ignore[arg-type]

    def frame(self) -> Frame:
        return Frame(FrameType.CREDENTIALS, 0, self.encode())


_CREDENTIAL_KEYS: Final = frozenset(
    {"access_key_id", "secret_access_key", "session_token", "expiration"}
)


# --- Attestation and inference --------------------------------------------------------------------


def check_nonce(nonce: object) -> bytes:
    """An ATTESTATION_REQUEST payload: the consumer's nonce, 16..64 bytes."""
    if type(nonce) is not bytes or not MIN_NONCE <= len(nonce) <= MAX_NONCE:
        raise FrameError(f"nonce must be {MIN_NONCE}..{MAX_NONCE} bytes")
    return nonce


class InferMode(enum.IntEnum):
    """The first byte of an INFER_REQUEST payload: how the request was encapsulated, which is
    also how the response will be."""

    SINGLE = 0  # message/ohttp-req → message/ohttp-res
    CHUNKED = 1  # message/ohttp-chunked-req → message/ohttp-chunked-res

    @property
    def request_media_type(self) -> str:
        return MEDIA_TYPE_REQUEST if self is InferMode.SINGLE else MEDIA_TYPE_CHUNKED_REQUEST

    @property
    def response_media_type(self) -> str:
        return MEDIA_TYPE_RESPONSE if self is InferMode.SINGLE else MEDIA_TYPE_CHUNKED_RESPONSE

    @classmethod
    def for_media_type(cls, media_type: str) -> InferMode:
        """The mode of a request ``Content-Type`` (parameters ignored, case-insensitive)."""
        base = media_type.split(";", 1)[0].strip().lower()
        for mode in cls:
            if base == mode.request_media_type:
                return mode
        raise FrameError(
            f"content type must be {MEDIA_TYPE_REQUEST} or {MEDIA_TYPE_CHUNKED_REQUEST}"
        )


@dataclass(frozen=True)
class InferRequest:
    """INFER_REQUEST: mode u8 ‖ the encapsulated request, as the consumer sent it."""

    mode: InferMode
    message: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.mode, InferMode):
            raise FrameError("mode must be an InferMode")
        if type(self.message) is not bytes or not 0 < len(self.message) <= MAX_INFER_REQUEST:
            raise FrameError(f"encapsulated request must be 1..{MAX_INFER_REQUEST} bytes")

    def encode(self) -> bytes:
        return bytes((self.mode,)) + self.message

    @classmethod
    def decode(cls, payload: bytes) -> InferRequest:
        if type(payload) is not bytes or len(payload) < 2:
            raise FrameError("INFER_REQUEST payload must be a mode byte and a request")
        try:
            mode = InferMode(payload[0])
        except ValueError:
            raise FrameError("INFER_REQUEST mode must be 0 or 1") from None
        return cls(mode, payload[1:])

    def frame(self, stream_id: int) -> Frame:
        return Frame(FrameType.INFER_REQUEST, stream_id, self.encode())


# --- The attestation document's user_data --------------------------------------------------------

USER_DATA_VERSION: Final = 1
MAX_MODEL_ID: Final = 256
_USER_DATA_KEYS: Final = frozenset({"v", "ohttp_key_config", "model_id", "manifest_sha256"})
_MAX_KEY_CONFIG: Final = 512  # one RFC 9458 key configuration: 41 bytes with three suites


@dataclass(frozen=True)
class UserData:
    """What the enclave binds into its attestation document's ``user_data``, so that verifying
    the document and learning where to encrypt are one act: deterministic CBOR
    ``{"v": 1, "ohttp_key_config": bytes, "model_id": text, "manifest_sha256": bytes(32)}``.

    The enclave writes it (:meth:`encode`), the consumer reads it (:meth:`decode`, strict: exactly
    these keys, one item, no tags). The key configuration's own syntax is checked by its parser
    (:meth:`protocol.ohttp.KeyConfig.from_bytes`).
    """

    ohttp_key_config: bytes
    model_id: str
    manifest_sha256: bytes

    def __post_init__(self) -> None:
        if type(self.ohttp_key_config) is not bytes or not (
            0 < len(self.ohttp_key_config) <= _MAX_KEY_CONFIG
        ):
            raise FrameError(f"user_data.ohttp_key_config must be 1..{_MAX_KEY_CONFIG} bytes")
        model_id = self.model_id
        if type(model_id) is not str or not 0 < len(model_id) <= MAX_MODEL_ID:
            raise FrameError(f"user_data.model_id must be text of 1..{MAX_MODEL_ID} characters")
        if not model_id.isprintable():
            raise FrameError("user_data.model_id must be printable")
        if type(self.manifest_sha256) is not bytes or len(self.manifest_sha256) != 32:
            raise FrameError("user_data.manifest_sha256 must be 32 bytes")

    def encode(self) -> bytes:
        return canonical_dumps(
            {
                "v": USER_DATA_VERSION,
                "ohttp_key_config": self.ohttp_key_config,
                "model_id": self.model_id,
                "manifest_sha256": self.manifest_sha256,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> UserData:
        """Parse a document's ``user_data`` (signed, but checked field by field all the same)."""
        value = _decode_map(data, "user_data", _USER_DATA_KEYS)
        if type(value["v"]) is not int or value["v"] != USER_DATA_VERSION:
            raise FrameError(f"user_data.v must be {USER_DATA_VERSION}")
        return cls(
            ohttp_key_config=value["ohttp_key_config"],  # type: ignore[arg-type]
            model_id=value["model_id"],  # type: ignore[arg-type]
            manifest_sha256=value["manifest_sha256"],  # type: ignore[arg-type]
        )
