"""Oblivious HTTP (RFC 9458) and its chunked variant (draft-ietf-ohai-chunked-ohttp-06).

A consumer encrypts a Binary HTTP request (:mod:`protocol.bhttp`) to the enclave's HPKE key, whose
key configuration it took from a verified attestation document; the parent forwards ciphertext
only. The enclave decrypts it and encrypts its response under keys exported from the same HPKE
context, so only that consumer can read it.

Wire formats (``‖`` is concatenation, integers big-endian):

- key configuration (RFC 9458 §3): ``key_id u8 ‖ kem_id u16 ‖ public_key (Npk) ‖
  u16 length ‖ (kdf_id u16 ‖ aead_id u16)…``; ``application/ohttp-keys`` (RFC 9458 §3.2) is a
  sequence of key configurations each prefixed by its u16 length;
- request (RFC 9458 §4.3): ``hdr ‖ enc ‖ ct`` with ``hdr = key_id ‖ kem_id ‖ kdf_id ‖ aead_id``,
  HPKE info ``"message/bhttp request" ‖ 0x00 ‖ hdr``, ``ct = Seal(aad="", request)``;
- response (RFC 9458 §4.4): ``response_nonce ‖ ct``, ``response_nonce`` random of
  ``max(Nn, Nk)`` bytes; ``secret = Export("message/bhttp response", max(Nn, Nk))``,
  ``prk = Extract(enc ‖ response_nonce, secret)``, ``key = Expand(prk, "key", Nk)``,
  ``nonce = Expand(prk, "nonce", Nn)``, ``ct = AEAD-Seal(key, nonce, "", response)``;
- chunked request (chunked draft "Request Format" and "Request Encapsulation", media type
  ``message/ohttp-chunked-req``): ``hdr ‖ enc`` as above, with HPKE info
  ``"message/bhttp chunked request" ‖ 0x00 ‖ hdr``, then non-final chunks
  ``varint(len(ct_i)) ‖ ct_i`` with ``ct_i = Seal(aad="", chunk_i)`` (HPKE sequence numbers
  0, 1, …), then the final chunk ``varint(0) ‖ Seal(aad="final", last_chunk)``, which runs to the
  end of the stream;
- chunked response ("Response Format", "Response Encapsulation", ``message/ohttp-chunked-res``):
  ``response_nonce ‖ chunks`` framed the same way; keys as for a response but exported with
  ``"message/bhttp chunked response"``, and chunk ``i`` sealed with ``nonce XOR I2OSP(i, Nn)``
  and AAD ``""`` (``"final"`` for the last).

A chunked request may hold at most :data:`MAX_REQUEST_CHUNKS` (1024) chunks, the final one
included: each costs an AEAD open, so 16 MiB of empty chunks (a million) must not buy seconds of
CPU. The chunk framing and sealing live in ``protocol._chunked`` (re-exported here).

The final chunk's ``"final"`` AAD is what makes truncation detectable: a stream that ends before a
final chunk authenticates is refused (:class:`DecapsulationError`), never taken as complete. A
chunked request is answered with a chunked response, a plain one with a plain one.

Errors: a request naming another key id is :class:`UnknownKeyId` (the client should fetch the key
configuration again); every authentication failure is one :class:`DecapsulationError` message (no
oracle); anything that breaks the format, or a size cap, is :class:`MalformedMessage`; misuse of
this API by our own code (a wrong-size key or nonce) is :class:`ConfigError`.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import InvalidTag

from protocol import hpke
from protocol._chunked import (
    CHUNKED_RESPONSE_LABEL,
    FINAL_AAD,
    MAX_MESSAGE_SIZE,
    ChunkedRequestWriter,
    ChunkedResponseReader,
    ChunkedResponseWriter,
    ChunkReader,
    check_bytes,
    response_keys,
    response_nonce_size,
)
from protocol.errors import ConfigError, DecapsulationError, MalformedMessage, UnknownKeyId
from protocol.hpke import AeadId, KdfId, KemId, Suite

__all__ = [
    "DEFAULT_ALGORITHMS",
    "MAX_MESSAGE_SIZE",
    "MAX_REQUEST_CHUNKS",
    "MEDIA_TYPE_CHUNKED_REQUEST",
    "MEDIA_TYPE_CHUNKED_RESPONSE",
    "MEDIA_TYPE_KEYS",
    "MEDIA_TYPE_REQUEST",
    "MEDIA_TYPE_RESPONSE",
    "ChunkedRequestReader",
    "ChunkedRequestWriter",
    "ChunkedResponseReader",
    "ChunkedResponseWriter",
    "ClientContext",
    "KeyConfig",
    "ServerContext",
    "chunked_request_reader",
    "decapsulate_request",
    "encapsulate_chunked_request",
    "encapsulate_request",
    "encode_key_configs",
    "generate_key_config",
    "parse_key_configs",
]

MEDIA_TYPE_KEYS: Final = "application/ohttp-keys"
MEDIA_TYPE_REQUEST: Final = "message/ohttp-req"
MEDIA_TYPE_RESPONSE: Final = "message/ohttp-res"
MEDIA_TYPE_CHUNKED_REQUEST: Final = "message/ohttp-chunked-req"
MEDIA_TYPE_CHUNKED_RESPONSE: Final = "message/ohttp-chunked-res"

_REQUEST_LABEL: Final = b"message/bhttp request"
_RESPONSE_LABEL: Final = b"message/bhttp response"
_CHUNKED_REQUEST_LABEL: Final = b"message/bhttp chunked request"

# Caps (and MAX_MESSAGE_SIZE, 17 MiB: a whole message or chunked stream, from protocol._chunked).
MAX_REQUEST_CHUNKS: Final = 1024  # chunks of one chunked request, the final one included
MAX_KEY_CONFIG_ALGORITHMS: Final = 64  # symmetric (kdf, aead) pairs in one key configuration
MAX_KEY_CONFIGS: Final = 32  # configurations in one application/ohttp-keys list

_KDF_IDS: Final = frozenset(int(k) for k in KdfId)
_AEAD_IDS: Final = frozenset(int(a) for a in AeadId)
_HDR_SIZE: Final = 7  # key_id u8 ‖ kem_id u16 ‖ kdf_id u16 ‖ aead_id u16

# Preference order of a generated key configuration (clients take the first they support).
DEFAULT_ALGORITHMS: Final[tuple[tuple[int, int], ...]] = (
    (KdfId.HKDF_SHA256, AeadId.AES_256_GCM),
    (KdfId.HKDF_SHA256, AeadId.AES_128_GCM),
    (KdfId.HKDF_SHA256, AeadId.CHACHA20_POLY1305),
)


# --- Key configurations, RFC 9458 §3 -------------------------------------------------------------


@dataclass(frozen=True)
class KeyConfig:
    """One OHTTP key configuration (RFC 9458 §3.1); the KEM must be DHKEM(X25519, HKDF-SHA256).

    ``algorithms`` lists ``(kdf_id, aead_id)`` pairs in the server's order of preference; pairs
    this module does not implement may appear (a client skips them).
    """

    key_id: int
    public_key: bytes
    algorithms: tuple[tuple[int, int], ...] = DEFAULT_ALGORITHMS
    kem_id: int = KemId.DHKEM_X25519_HKDF_SHA256

    def __post_init__(self) -> None:
        if type(self.key_id) is not int or not 0 <= self.key_id <= 0xFF:
            raise MalformedMessage("key configuration: key_id must be 0..255")
        if self.kem_id != KemId.DHKEM_X25519_HKDF_SHA256:
            raise MalformedMessage(f"key configuration: KEM 0x{self.kem_id:04x} is not supported")
        if type(self.public_key) is not bytes or len(self.public_key) != 32:
            raise MalformedMessage("key configuration: public_key must be 32 bytes (X25519)")
        if (
            not isinstance(self.algorithms, tuple)
            or not 1 <= len(self.algorithms) <= MAX_KEY_CONFIG_ALGORITHMS
        ):
            raise MalformedMessage(
                f"key configuration: 1..{MAX_KEY_CONFIG_ALGORITHMS} symmetric algorithms"
            )
        for pair in self.algorithms:
            if (
                not isinstance(pair, tuple)
                or len(pair) != 2
                or not all(type(i) is int or isinstance(i, enum.IntEnum) for i in pair)
                or not all(0 <= i <= 0xFFFF for i in pair)
            ):
                raise MalformedMessage("key configuration: algorithms are (kdf_id, aead_id) u16s")

    def to_bytes(self) -> bytes:
        """The RFC 9458 §3.1 encoding."""
        algorithms = b"".join(
            kdf.to_bytes(2, "big") + aead.to_bytes(2, "big") for kdf, aead in self.algorithms
        )
        return (
            self.key_id.to_bytes(1, "big")
            + self.kem_id.to_bytes(2, "big")
            + self.public_key
            + len(algorithms).to_bytes(2, "big")
            + algorithms
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyConfig:
        """Parse exactly one key configuration (no trailing bytes).

        ``data`` may come from the untrusted parent; bind it to a verified attestation document
        before use.
        """
        config, end = _parse_key_config(data, 0)
        if end != len(data):
            raise MalformedMessage(f"key configuration: {len(data) - end} trailing bytes")
        return config

    def suite(self) -> Suite:
        """The first ``(kdf, aead)`` pair this module implements, as a full HPKE suite."""
        for kdf_id, aead_id in self.algorithms:
            if kdf_id in _KDF_IDS and aead_id in _AEAD_IDS:
                return Suite(KemId(self.kem_id), KdfId(kdf_id), AeadId(aead_id))
        raise MalformedMessage("key configuration offers no supported (kdf, aead) pair")

    def offers(self, suite: Suite) -> bool:
        """Whether this configuration lists ``suite``'s KDF and AEAD."""
        return (suite.kdf_id, suite.aead_id) in {(k, a) for k, a in self.algorithms}


def _u16(data: bytes, pos: int, what: str) -> int:
    if pos + 2 > len(data):
        raise MalformedMessage(f"key configuration: truncated {what}")
    return int.from_bytes(data[pos : pos + 2], "big")


def _parse_key_config(data: object, pos: int) -> tuple[KeyConfig, int]:
    if type(data) is not bytes:
        raise MalformedMessage("key configuration must be bytes")
    if pos + 3 > len(data):
        raise MalformedMessage("key configuration: truncated header")
    key_id = data[pos]
    kem_id = _u16(data, pos + 1, "kem_id")
    if kem_id != KemId.DHKEM_X25519_HKDF_SHA256:
        raise MalformedMessage(f"key configuration: KEM 0x{kem_id:04x} is not supported")
    pos += 3
    if pos + 32 > len(data):
        raise MalformedMessage("key configuration: truncated public key")
    public_key = data[pos : pos + 32]
    pos += 32
    length = _u16(data, pos, "algorithms length")
    pos += 2
    if length == 0 or length % 4 or length > 4 * MAX_KEY_CONFIG_ALGORITHMS:
        raise MalformedMessage(
            f"key configuration: algorithms length {length} is not a multiple of 4 "
            f"in 4..{4 * MAX_KEY_CONFIG_ALGORITHMS}"
        )
    if pos + length > len(data):
        raise MalformedMessage("key configuration: truncated algorithms")
    algorithms = tuple(
        (_u16(data, i, "kdf_id"), _u16(data, i + 2, "aead_id")) for i in range(pos, pos + length, 4)
    )
    return KeyConfig(key_id, public_key, algorithms, kem_id), pos + length


def parse_key_configs(data: bytes) -> list[KeyConfig]:
    """Parse an ``application/ohttp-keys`` body (RFC 9458 §3.2): u16-length-prefixed configs.

    ``data`` is untrusted. Configurations with a KEM other than X25519 are skipped (§3.2: clients
    ignore what they do not support); an empty result is refused.
    """
    if type(data) is not bytes:
        raise MalformedMessage("key configurations must be bytes")
    configs: list[KeyConfig] = []
    pos = count = 0
    while pos < len(data):
        count += 1
        if count > MAX_KEY_CONFIGS:
            raise MalformedMessage(f"more than {MAX_KEY_CONFIGS} key configurations")
        length = _u16(data, pos, "length prefix")
        pos += 2
        if pos + length > len(data):
            raise MalformedMessage("key configuration: longer than the rest of the list")
        entry = data[pos : pos + length]
        pos += length
        if len(entry) >= 3 and int.from_bytes(entry[1:3], "big") != KemId.DHKEM_X25519_HKDF_SHA256:
            continue
        configs.append(KeyConfig.from_bytes(entry))
    if not configs:
        raise MalformedMessage("no key configuration with a supported KEM")
    return configs


def encode_key_configs(configs: Iterable[KeyConfig]) -> bytes:
    """The ``application/ohttp-keys`` encoding of ``configs``."""
    out = bytearray()
    for config in configs:
        encoded = config.to_bytes()
        out += len(encoded).to_bytes(2, "big") + encoded
    return bytes(out)


def generate_key_config(key_id: int, *, private_key: bytes | None = None) -> tuple[bytes, bytes]:
    """A key pair and its key configuration: ``(private_key, key_config)``, with
    :data:`DEFAULT_ALGORITHMS`. ``private_key`` fixes the key (tests, vectors); by default fresh."""
    if private_key is None:
        private_key, public_key = hpke.generate_key_pair()
    else:
        public_key = hpke.public_key_of(private_key)
    return private_key, KeyConfig(key_id, public_key).to_bytes()


# --- Shared pieces --------------------------------------------------------------------------------


def _fresh_response_nonce(suite: Suite, given: bytes | None) -> bytes:
    size = response_nonce_size(suite)
    if given is None:
        return os.urandom(size)
    if type(given) is not bytes or len(given) != size:
        raise ConfigError(f"response_nonce must be {size} bytes for this suite")
    return given


def _hdr(key_id: int, suite: Suite) -> bytes:
    return (
        key_id.to_bytes(1, "big")
        + suite.kem_id.to_bytes(2, "big")
        + suite.kdf_id.to_bytes(2, "big")
        + suite.aead_id.to_bytes(2, "big")
    )


def _info(label: bytes, hdr: bytes) -> bytes:
    return label + b"\x00" + hdr


def _parse_header(data: bytes, config: KeyConfig) -> tuple[Suite, bytes, bytes]:
    """``(suite, hdr, enc)`` from the start of a request (RFC 9458 §4.3; the chunked draft's
    "Request Format" has the same header)."""
    if len(data) < _HDR_SIZE:
        raise MalformedMessage("request: truncated header")
    key_id = data[0]
    # (1) the key id picks the key: another one means the client holds a stale configuration
    if key_id != config.key_id:
        raise UnknownKeyId(f"request: key id {key_id} is not this server's ({config.key_id})")
    kem_id = int.from_bytes(data[1:3], "big")
    if kem_id != config.kem_id:
        raise MalformedMessage(f"request: KEM 0x{kem_id:04x} does not match the key configuration")
    # (2) the suite must be one the configuration offers
    suite = Suite.from_ids(
        kem_id, int.from_bytes(data[3:5], "big"), int.from_bytes(data[5:7], "big")
    )
    if not config.offers(suite):
        raise MalformedMessage("request: the (kdf, aead) pair is not in the key configuration")
    end = _HDR_SIZE + suite.nenc
    if len(data) < end:
        raise MalformedMessage("request: truncated encapsulated key")
    return suite, data[:_HDR_SIZE], data[_HDR_SIZE:end]


def _server_config(private_key: bytes, key_config: bytes) -> KeyConfig:
    config = KeyConfig.from_bytes(key_config)
    if hpke.public_key_of(private_key) != config.public_key:
        raise ConfigError("the private key does not match the key configuration's public key")
    return config


# --- Clients -------------------------------------------------------------------------------------


@dataclass
class ClientContext:
    """What a client keeps to read the response to its request (one per request)."""

    _context: hpke.SenderContext = field(repr=False)
    _enc: bytes = field(repr=False)
    chunked: bool

    def decapsulate_response(self, data: bytes) -> bytes:
        """Decrypt an encapsulated response (RFC 9458 §4.4). ``data`` is untrusted (it arrives
        through the untrusted parent).

        Raises :class:`MalformedMessage` if it is too short or too large, and
        :class:`DecapsulationError` if it does not authenticate.
        """
        if self.chunked:
            raise ConfigError("a chunked request is answered by a chunked response")
        data = check_bytes(data, "response")
        suite = self._context.suite
        nonce_size = response_nonce_size(suite)
        if len(data) < nonce_size + suite.nt:
            raise MalformedMessage(
                f"response is shorter than its nonce and tag ({nonce_size} + 16)"
            )
        key, nonce = response_keys(self._context, _RESPONSE_LABEL, self._enc, data[:nonce_size])
        try:
            return suite.aead(key).decrypt(nonce, data[nonce_size:], b"")
        except InvalidTag:
            raise DecapsulationError("response: decryption failed") from None

    def chunked_response_reader(self, *, max_size: int = MAX_MESSAGE_SIZE) -> ChunkedResponseReader:
        """A reader for the chunked response to this (chunked) request."""
        if not self.chunked:
            raise ConfigError("a plain request is answered by a plain response")
        return ChunkedResponseReader(self._context, self._enc, max_size)


def encapsulate_request(
    key_config: bytes, request: bytes, *, ephemeral_private_key: bytes | None = None
) -> tuple[bytes, ClientContext]:
    """Encrypt ``request`` (a BHTTP message) to the server of ``key_config`` (RFC 9458 §4.3).

    Takes the first ``(kdf, aead)`` pair of the configuration this module implements.
    ``ephemeral_private_key`` fixes the HPKE ephemeral key: test vectors only.
    """
    config = KeyConfig.from_bytes(key_config)
    request = check_bytes(request, "request", MAX_MESSAGE_SIZE - 1024)
    suite = config.suite()
    hdr = _hdr(config.key_id, suite)
    enc, context = hpke.setup_base_sender(
        suite,
        config.public_key,
        _info(_REQUEST_LABEL, hdr),
        ephemeral_private_key=ephemeral_private_key,
    )
    ct = context.seal(b"", request)
    return hdr + enc + ct, ClientContext(context, enc, chunked=False)


def encapsulate_chunked_request(
    key_config: bytes, *, ephemeral_private_key: bytes | None = None
) -> tuple[ChunkedRequestWriter, ClientContext]:
    """Start a chunked request (draft-ietf-ohai-chunked-ohttp-06, "Request Format") to the server of
    ``key_config``; its response is chunked too. ``ephemeral_private_key``: test vectors only."""
    config = KeyConfig.from_bytes(key_config)
    suite = config.suite()
    hdr = _hdr(config.key_id, suite)
    enc, context = hpke.setup_base_sender(
        suite,
        config.public_key,
        _info(_CHUNKED_REQUEST_LABEL, hdr),
        ephemeral_private_key=ephemeral_private_key,
    )
    return ChunkedRequestWriter(context, hdr + enc), ClientContext(context, enc, chunked=True)


# --- Servers -------------------------------------------------------------------------------------


@dataclass
class ServerContext:
    """What a server keeps to answer one decapsulated request."""

    _context: hpke.RecipientContext = field(repr=False)
    _enc: bytes = field(repr=False)
    chunked: bool

    @property
    def suite(self) -> Suite:
        """The HPKE suite the client chose."""
        return self._context.suite

    @property
    def enc(self) -> bytes:
        """The request's encapsulated key (public: it travelled in clear). A fresh one is drawn
        for every request, so a server that has seen it before is looking at a replay."""
        return self._enc

    def encapsulate_response(
        self, response: bytes, *, response_nonce: bytes | None = None
    ) -> bytes:
        """Encrypt ``response`` (a BHTTP message) for the client (RFC 9458 §4.4).

        ``response_nonce`` fixes the nonce: test vectors only (by default it is random).
        """
        if self.chunked:
            raise ConfigError("a chunked request is answered by a chunked response")
        response = check_bytes(response, "response", MAX_MESSAGE_SIZE - 1024)
        nonce_bytes = _fresh_response_nonce(self.suite, response_nonce)
        key, nonce = response_keys(self._context, _RESPONSE_LABEL, self._enc, nonce_bytes)
        return nonce_bytes + self.suite.aead(key).encrypt(nonce, response, b"")

    def chunked_response(self, *, response_nonce: bytes | None = None) -> ChunkedResponseWriter:
        """A writer for the chunked response to this chunked request (chunked draft,
        "Response Encapsulation")."""
        if not self.chunked:
            raise ConfigError("a plain request is answered by a plain response")
        nonce_bytes = _fresh_response_nonce(self.suite, response_nonce)
        key, nonce = response_keys(self._context, CHUNKED_RESPONSE_LABEL, self._enc, nonce_bytes)
        return ChunkedResponseWriter(self.suite, key, nonce, nonce_bytes)


def decapsulate_request(
    private_key: bytes, key_config: bytes, data: bytes
) -> tuple[bytes, ServerContext]:
    """Decrypt an encapsulated request (RFC 9458 §4.3) with this server's key.

    ``data`` is untrusted: it comes from a client through the untrusted parent. ``key_config`` is
    this server's own configuration (the one ``private_key`` belongs to). Raises
    :class:`UnknownKeyId` if the request names another key id, :class:`MalformedMessage` if it
    breaks the format, :class:`DecapsulationError` if it does not authenticate.
    """
    config = _server_config(private_key, key_config)
    data = check_bytes(data, "request")
    suite, hdr, enc = _parse_header(data, config)
    ct = data[_HDR_SIZE + suite.nenc :]
    if len(ct) < suite.nt:
        raise MalformedMessage("request: ciphertext shorter than the AEAD tag")
    try:
        context = hpke.setup_base_recipient(suite, enc, private_key, _info(_REQUEST_LABEL, hdr))
        request = context.open(b"", ct)
    except DecapsulationError:
        raise DecapsulationError("request: decryption failed") from None
    return request, ServerContext(context, enc, chunked=False)


# --- Chunk readers (both directions) --------------------------------------------------------------


class ChunkedRequestReader(ChunkReader):
    """Reads a chunked request (``message/ohttp-chunked-req``) with this server's key:
    :meth:`feed` the stream as it arrives, then :meth:`close` when it ends; :attr:`context`
    answers it once the whole request has authenticated."""

    def __init__(
        self,
        private_key: bytes,
        key_config: bytes,
        max_size: int,
        max_chunks: int = MAX_REQUEST_CHUNKS,
    ) -> None:
        self._config = _server_config(private_key, key_config)
        self._private_key = private_key
        self._hpke: hpke.RecipientContext | None = None
        self._server: ServerContext | None = None
        # The prefix size depends on the suite; X25519's enc is 32 bytes for every suite here.
        super().__init__(_HDR_SIZE + 32, max_size, "request", max_chunks=max_chunks)

    @property
    def context(self) -> ServerContext:
        """The context for the chunked response; available once the final chunk authenticated
        (so no answer goes to a request that was cut short)."""
        if self._server is None or not self.finished:
            raise ConfigError("the request is not complete yet")
        return self._server

    def _on_prefix(self, prefix: bytes) -> None:
        suite, hdr, enc = _parse_header(prefix, self._config)
        try:
            self._hpke = hpke.setup_base_recipient(
                suite, enc, self._private_key, _info(_CHUNKED_REQUEST_LABEL, hdr)
            )
        except DecapsulationError:
            raise DecapsulationError("request: decryption failed") from None
        self._server = ServerContext(self._hpke, enc, chunked=True)

    def _open(self, ct: bytes, final: bool) -> bytes:
        if self._hpke is None:
            raise DecapsulationError("request: the stream ended before its final chunk")
        try:
            return self._hpke.open(FINAL_AAD if final else b"", ct)
        except DecapsulationError:
            raise DecapsulationError("request: decryption failed") from None


def chunked_request_reader(
    private_key: bytes,
    key_config: bytes,
    *,
    max_size: int = MAX_MESSAGE_SIZE,
    max_chunks: int = MAX_REQUEST_CHUNKS,
) -> ChunkedRequestReader:
    """Start reading a chunked request with this server's key (see :class:`ChunkedRequestReader`).

    The stream is untrusted: it comes from a client through the untrusted parent. More than
    ``max_chunks`` chunks (the final one included) is :class:`MalformedMessage`.
    """
    return ChunkedRequestReader(private_key, key_config, max_size, max_chunks)
