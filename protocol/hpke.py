"""RFC 9180 Hybrid Public Key Encryption, base mode, for the suites Oblivious HTTP uses here.

KEM ``DHKEM(X25519, HKDF-SHA256)`` (0x0020), KDF ``HKDF-SHA256`` (0x0001), AEAD ``AES-128-GCM``
(0x0001), ``AES-256-GCM`` (0x0002) or ``ChaCha20-Poly1305`` (0x0003); base mode only (no PSK, no
sender authentication), with the secret exporter (RFC 9180 §5.3), which OHTTP responses need.

Why not ``cryptography.hazmat.primitives.hpke``: its ``Suite`` offers single-shot
``encrypt``/``decrypt`` only, with no exporter and no way to fix the ephemeral key, so neither the
OHTTP response keys nor the RFC test vectors can be made with it. This module builds the labeled
key schedule on ``cryptography``'s primitives (X25519, HMAC-SHA256, HKDF-Expand, the AEADs);
``tests/protocol/test_hpke.py`` checks it against the RFC 9180 Appendix A vectors and for interop
with ``cryptography``'s ``Suite`` in both directions.

Keys are raw bytes (RFC 9180 §7.1.1 ``SerializePublicKey``/``SerializePrivateKey`` for X25519: the
32-byte RFC 7748 strings). The ephemeral key is a parameter so that test vectors can be reproduced;
leave it ``None`` everywhere else.
"""

from __future__ import annotations

import enum
import hmac
from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from protocol.errors import ConfigError, DecapsulationError, MalformedMessage, OhttpError

__all__ = [
    "MODE_BASE",
    "AeadId",
    "KdfId",
    "KemId",
    "RecipientContext",
    "SenderContext",
    "Suite",
    "derive_key_pair",
    "expand",
    "extract",
    "generate_key_pair",
    "public_key_of",
    "setup_base_recipient",
    "setup_base_sender",
]

MODE_BASE: Final = 0x00
_HPKE_V1: Final = b"HPKE-v1"
_NH: Final = 32  # HKDF-SHA256 output size
_NSECRET: Final = 32  # DHKEM(X25519) shared secret size
_NPK: Final = 32  # X25519 public key (and enc) size
_NSK: Final = 32  # X25519 private key size


class KemId(enum.IntEnum):
    """RFC 9180 §7.1 KEM identifiers (the one implemented here)."""

    DHKEM_X25519_HKDF_SHA256 = 0x0020


class KdfId(enum.IntEnum):
    """RFC 9180 §7.2 KDF identifiers (the one implemented here)."""

    HKDF_SHA256 = 0x0001


class AeadId(enum.IntEnum):
    """RFC 9180 §7.3 AEAD identifiers (the ones implemented here)."""

    AES_128_GCM = 0x0001
    AES_256_GCM = 0x0002
    CHACHA20_POLY1305 = 0x0003


# AEAD id -> (Nk, Nn, Nt), RFC 9180 §7.3.
_AEAD_SIZES: Final[dict[AeadId, tuple[int, int, int]]] = {
    AeadId.AES_128_GCM: (16, 12, 16),
    AeadId.AES_256_GCM: (32, 12, 16),
    AeadId.CHACHA20_POLY1305: (32, 12, 16),
}


@dataclass(frozen=True)
class Suite:
    """An HPKE ciphersuite this module implements; build it with :meth:`from_ids`."""

    kem_id: KemId
    kdf_id: KdfId
    aead_id: AeadId

    @classmethod
    def from_ids(cls, kem_id: int, kdf_id: int, aead_id: int) -> Suite:
        """The suite for these wire identifiers; ``MalformedMessage`` if any is not implemented."""
        try:
            return cls(KemId(kem_id), KdfId(kdf_id), AeadId(aead_id))
        except ValueError:
            raise MalformedMessage(
                f"HPKE suite (kem 0x{kem_id:04x}, kdf 0x{kdf_id:04x}, aead 0x{aead_id:04x}) "
                "is not supported"
            ) from None

    @property
    def nk(self) -> int:
        """AEAD key size in bytes."""
        return _AEAD_SIZES[self.aead_id][0]

    @property
    def nn(self) -> int:
        """AEAD nonce size in bytes."""
        return _AEAD_SIZES[self.aead_id][1]

    @property
    def nt(self) -> int:
        """AEAD tag size in bytes."""
        return _AEAD_SIZES[self.aead_id][2]

    @property
    def nenc(self) -> int:
        """Size of the encapsulated key ``enc`` in bytes."""
        return _NPK

    @property
    def npk(self) -> int:
        """Size of a serialized public key in bytes."""
        return _NPK

    @property
    def suite_id(self) -> bytes:
        """RFC 9180 §5.1: ``"HPKE" ‖ I2OSP(kem_id, 2) ‖ I2OSP(kdf_id, 2) ‖ I2OSP(aead_id, 2)``."""
        return b"HPKE" + _i2osp(self.kem_id, 2) + _i2osp(self.kdf_id, 2) + _i2osp(self.aead_id, 2)

    def aead(self, key: bytes) -> AESGCM | ChaCha20Poly1305:
        """The AEAD of this suite keyed with ``key`` (``Nk`` bytes)."""
        if self.aead_id is AeadId.CHACHA20_POLY1305:
            return ChaCha20Poly1305(key)
        return AESGCM(key)


_KEM_SUITE_ID: Final = b"KEM" + KemId.DHKEM_X25519_HKDF_SHA256.to_bytes(2, "big")


def _i2osp(value: int, length: int) -> bytes:
    return value.to_bytes(length, "big")


# --- KDF (RFC 5869 via RFC 9180 §4) ------------------------------------------------------------


def extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-SHA256 Extract (RFC 5869 §2.2); an empty salt means ``Nh`` zero bytes."""
    return hmac.digest(salt or bytes(_NH), ikm, "sha256")


def expand(prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 Expand (RFC 5869 §2.3), ``length`` ≤ 255·Nh."""
    if not 0 < length <= 255 * _NH:
        raise ConfigError(f"HKDF-Expand length {length} is outside 1..{255 * _NH}")
    return HKDFExpand(hashes.SHA256(), length, info).derive(prk)


def _labeled_extract(suite_id: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    # RFC 9180 §4: LabeledExtract(salt, label, ikm)
    return extract(salt, _HPKE_V1 + suite_id + label + ikm)


def _labeled_expand(suite_id: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    # RFC 9180 §4: LabeledExpand(prk, label, info, L), with I2OSP(L, 2) first
    if not 0 < length < 1 << 16:
        raise ConfigError(f"LabeledExpand length {length} does not fit two bytes")
    return expand(prk, _i2osp(length, 2) + _HPKE_V1 + suite_id + label + info, length)


# --- KEM: DHKEM(X25519, HKDF-SHA256), RFC 9180 §4.1 ----------------------------------------------


def _private_key(sk: bytes, what: str) -> X25519PrivateKey:
    if type(sk) is not bytes or len(sk) != _NSK:
        raise ConfigError(f"{what} must be {_NSK} bytes")
    return X25519PrivateKey.from_private_bytes(sk)


def public_key_of(private_key: bytes) -> bytes:
    """The serialized X25519 public key of a 32-byte private key."""
    return _private_key(private_key, "private key").public_key().public_bytes_raw()


def generate_key_pair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as ``(private_key, public_key)`` bytes."""
    sk = X25519PrivateKey.generate()
    return sk.private_bytes_raw(), sk.public_key().public_bytes_raw()


def derive_key_pair(ikm: bytes) -> tuple[bytes, bytes]:
    """RFC 9180 §7.1.3 DeriveKeyPair for X25519: ``(private_key, public_key)`` from ``ikm``."""
    if len(ikm) < _NSK:
        raise ConfigError(f"DeriveKeyPair input keying material must be at least {_NSK} bytes")
    dkp_prk = _labeled_extract(_KEM_SUITE_ID, b"", b"dkp_prk", ikm)
    sk = _labeled_expand(_KEM_SUITE_ID, dkp_prk, b"sk", b"", _NSK)
    return sk, public_key_of(sk)


def _extract_and_expand(dh: bytes, kem_context: bytes) -> bytes:
    eae_prk = _labeled_extract(_KEM_SUITE_ID, b"", b"eae_prk", dh)
    return _labeled_expand(_KEM_SUITE_ID, eae_prk, b"shared_secret", kem_context, _NSECRET)


def _encap(pk_r: bytes, sk_e: bytes | None) -> tuple[bytes, bytes]:
    """RFC 9180 §4.1 Encap: ``(shared_secret, enc)``. ``pk_r`` is the recipient's published key."""
    if type(pk_r) is not bytes or len(pk_r) != _NPK:
        raise MalformedMessage(f"HPKE public key must be {_NPK} bytes")
    ephemeral = X25519PrivateKey.generate() if sk_e is None else _private_key(sk_e, "ephemeral key")
    enc = ephemeral.public_key().public_bytes_raw()
    try:
        # RFC 9180 §7.1.4: an all-zero X25519 output (a small-order public key) must abort.
        dh = ephemeral.exchange(X25519PublicKey.from_public_bytes(pk_r))
    except ValueError:
        raise MalformedMessage("HPKE public key is a small-order point") from None
    return _extract_and_expand(dh, enc + pk_r), enc


def _decap(enc: bytes, sk_r: bytes) -> bytes:
    """RFC 9180 §4.1 Decap. ``enc`` is untrusted; a bad one is an authentication failure."""
    recipient = _private_key(sk_r, "private key")
    if len(enc) != _NPK:
        raise MalformedMessage(f"HPKE encapsulated key must be {_NPK} bytes")
    try:
        dh = recipient.exchange(X25519PublicKey.from_public_bytes(enc))
    except ValueError:
        raise DecapsulationError("decryption failed") from None
    pk_rm = recipient.public_key().public_bytes_raw()
    return _extract_and_expand(dh, enc + pk_rm)


# --- Key schedule and contexts, RFC 9180 §5.1-§5.3 -----------------------------------------------


@dataclass
class _Context:
    suite: Suite
    _key: bytes = field(repr=False)
    _base_nonce: bytes = field(repr=False)
    _exporter_secret: bytes = field(repr=False)
    _seq: int = 0

    def _next_nonce(self) -> bytes:
        # RFC 9180 §5.2: nonce = base_nonce XOR I2OSP(seq, Nn); seq must never wrap.
        if self._seq >= (1 << (8 * self.suite.nn)) - 1:
            raise OhttpError("HPKE message limit reached")
        counter = _i2osp(self._seq, self.suite.nn)
        return bytes(a ^ b for a, b in zip(self._base_nonce, counter, strict=True))

    def export(self, exporter_context: bytes, length: int) -> bytes:
        """RFC 9180 §5.3: ``LabeledExpand(exporter_secret, "sec", exporter_context, L)``."""
        if not 0 < length <= 255 * _NH:
            raise ConfigError(f"export length {length} is outside 1..{255 * _NH}")
        return _labeled_expand(
            self.suite.suite_id, self._exporter_secret, b"sec", exporter_context, length
        )

    @property
    def sequence_number(self) -> int:
        """How many messages this context has sealed or opened."""
        return self._seq


class SenderContext(_Context):
    """The sender's encryption context: :meth:`seal` with increasing sequence numbers."""

    def seal(self, aad: bytes, plaintext: bytes) -> bytes:
        """RFC 9180 §5.2 ContextS.Seal: ciphertext ‖ tag."""
        nonce = self._next_nonce()
        ct = self.suite.aead(self._key).encrypt(nonce, plaintext, aad)
        self._seq += 1
        return ct


class RecipientContext(_Context):
    """The recipient's decryption context: :meth:`open` with increasing sequence numbers."""

    def open(self, aad: bytes, ciphertext: bytes) -> bytes:
        """RFC 9180 §5.2 ContextR.Open. ``ciphertext`` is untrusted.

        Raises :class:`DecapsulationError` (one message for every cause) if it does not
        authenticate; the sequence number then does not advance.
        """
        nonce = self._next_nonce()
        try:
            pt = self.suite.aead(self._key).decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise DecapsulationError("decryption failed") from None
        self._seq += 1
        return pt


def _key_schedule(suite: Suite, shared_secret: bytes, info: bytes) -> tuple[bytes, bytes, bytes]:
    sid = suite.suite_id
    # (1) mode_base: empty psk and psk_id (RFC 9180 §5.1)
    psk_id_hash = _labeled_extract(sid, b"", b"psk_id_hash", b"")
    info_hash = _labeled_extract(sid, b"", b"info_hash", info)
    key_schedule_context = bytes([MODE_BASE]) + psk_id_hash + info_hash
    # (2) secret = LabeledExtract(shared_secret, "secret", psk)
    secret = _labeled_extract(sid, shared_secret, b"secret", b"")
    # (3) key, base_nonce, exporter_secret
    key = _labeled_expand(sid, secret, b"key", key_schedule_context, suite.nk)
    base_nonce = _labeled_expand(sid, secret, b"base_nonce", key_schedule_context, suite.nn)
    exporter_secret = _labeled_expand(sid, secret, b"exp", key_schedule_context, _NH)
    return key, base_nonce, exporter_secret


def setup_base_sender(
    suite: Suite, public_key: bytes, info: bytes, *, ephemeral_private_key: bytes | None = None
) -> tuple[bytes, SenderContext]:
    """RFC 9180 §5.1.1 SetupBaseS: ``(enc, context)`` for the recipient's ``public_key``.

    ``ephemeral_private_key`` fixes the ephemeral key (test vectors only); by default it is fresh.
    """
    shared_secret, enc = _encap(public_key, ephemeral_private_key)
    key, base_nonce, exporter_secret = _key_schedule(suite, shared_secret, info)
    return enc, SenderContext(suite, key, base_nonce, exporter_secret)


def setup_base_recipient(
    suite: Suite, enc: bytes, private_key: bytes, info: bytes
) -> RecipientContext:
    """RFC 9180 §5.1.1 SetupBaseR. ``enc`` is untrusted (it comes from the sender)."""
    shared_secret = _decap(enc, private_key)
    key, base_nonce, exporter_secret = _key_schedule(suite, shared_secret, info)
    return RecipientContext(suite, key, base_nonce, exporter_secret)
