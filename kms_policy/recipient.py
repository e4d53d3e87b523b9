"""The KMS side of ``Recipient``: wrap a plaintext for an attested enclave as KMS does.

When a request to ``Decrypt``, ``GenerateDataKey`` or ``GenerateRandom`` carries
``Recipient={"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": doc}``, AWS KMS
omits ``Plaintext`` and returns ``CiphertextForRecipient``: the plaintext inside a CMS
``EnvelopedData`` addressed to the RSA public key of the attestation document (its ``public_key``
field, a DER SubjectPublicKeyInfo). The local KMS answers the same way with
:func:`envelope_for_recipient`.

The structure (RFC 5652 §3, §6.1, §6.2.1; RFC 4055 §4; RFC 3565 §4.1)::

    ContentInfo                                   SEQUENCE, indefinite length
      contentType         id-envelopedData
      content [0]         EnvelopedData           SEQUENCE, indefinite length
        version           2                       (a version 2 RecipientInfo, RFC 5652 §6.1)
        recipientInfos    SET OF one KeyTransRecipientInfo
          version         2                       (rid is a subjectKeyIdentifier, §6.2.1)
          rid [0]         SHA-1 of the subjectPublicKey BIT STRING (RFC 5280 §4.2.1.2, method 1)
          keyEncryptionAlgorithm  id-RSAES-OAEP { [0] sha256, [1] mgf1(sha256) }  (RFC 4055 §4.1)
          encryptedKey    RSAES-OAEP(content-encryption key)
        encryptedContentInfo                      SEQUENCE, indefinite length
          contentType     id-data
          contentEncryptionAlgorithm  id-aes256-CBC, IV as parameter  (RFC 3565 §4.1)
          encryptedContent [0]  constructed OCTET STRING in chunks, indefinite length

KMS emits BER with indefinite lengths, the way a streaming encoder (``openssl cms -stream``) does;
so does this module, byte for byte in the shape ``openssl cms -encrypt -stream -keyid`` produces,
so that enclave parsers are exercised as KMS exercises them. The hash AlgorithmIdentifiers carry
no parameters, the correct encoding per RFC 4055 §2.1 (and openssl's); ``pSourceAlgorithm`` is
left at its default (an empty label).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import MGF1, OAEP
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from kms_policy.errors import KmsPolicyError

__all__ = [
    "CEK_SIZE",
    "CONTENT_CHUNK_SIZE",
    "IV_SIZE",
    "MAX_RSA_BITS",
    "MIN_RSA_BITS",
    "RecipientError",
    "envelope_for_recipient",
    "recipient_public_key",
    "subject_key_identifier",
]

MIN_RSA_BITS: Final = 2048
MAX_RSA_BITS: Final = 4096
CEK_SIZE: Final = 32  # AES-256 content-encryption key for id-aes256-CBC (RFC 3565 §4.1)
IV_SIZE: Final = 16  # the AES block: the CBC IV (RFC 3565 §4.1)
CONTENT_CHUNK_SIZE: Final = 32
"""Bytes per primitive OCTET STRING in the constructed ``encryptedContent``; small enough that a
32-byte data key (48 bytes of ciphertext) arrives in two chunks, as ``openssl cms -stream`` sends
it."""


class RecipientError(KmsPolicyError):
    """The ``Recipient`` cannot be served: its public key is not an RSA key KMS would accept.

    The message names the rule (key type, modulus size); it never carries the plaintext.
    """


# -- a small BER writer (X.690 §8.1) --------------------------------------------------------------

_SEQUENCE: Final = 0x30
_SET: Final = 0x31
_INTEGER: Final = 0x02
_OCTET_STRING: Final = 0x04
_OID: Final = 0x06
_CONTEXT_0_CONSTRUCTED: Final = 0xA0
_CONTEXT_1_CONSTRUCTED: Final = 0xA1
_CONTEXT_0_PRIMITIVE: Final = 0x80
_INDEFINITE: Final = b"\x80"
_END_OF_CONTENTS: Final = b"\x00\x00"


def _length(size: int) -> bytes:
    """The definite length octets: short form below 128, else long form (X.690 §8.1.3)."""
    if size < 0x80:
        return bytes([size])
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


def _definite(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _length(len(content)) + content


def _indefinite(tag: int, parts: Iterable[bytes]) -> bytes:
    """A constructed value of indefinite length, closed by end-of-contents (X.690 §8.1.5)."""
    return bytes([tag]) + _INDEFINITE + b"".join(parts) + _END_OF_CONTENTS


def _oid(dotted: str) -> bytes:
    """An OBJECT IDENTIFIER (X.690 §8.19): base-128 arcs, the first two joined as 40·a + b."""
    arcs = [int(arc) for arc in dotted.split(".")]
    body = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return _definite(_OID, bytes(body))


def _small_integer(value: int) -> bytes:
    return _definite(_INTEGER, bytes([value]))


ID_ENVELOPED_DATA: Final = "1.2.840.113549.1.7.3"  # RFC 5652 §6.1
ID_DATA: Final = "1.2.840.113549.1.7.1"  # RFC 5652 §4
ID_RSAES_OAEP: Final = "1.2.840.113549.1.1.7"  # RFC 4055 §4.1
ID_MGF1: Final = "1.2.840.113549.1.1.8"  # RFC 4055 §2.2
ID_SHA256: Final = "2.16.840.1.101.3.4.2.1"  # RFC 4055 §2.1
ID_AES256_CBC: Final = "2.16.840.1.101.3.4.1.42"  # RFC 3565 §4.1

_SHA256_IDENTIFIER: Final = _definite(_SEQUENCE, _oid(ID_SHA256))  # parameters absent (§2.1)
_OAEP_SHA256_IDENTIFIER: Final = _definite(
    _SEQUENCE,
    _oid(ID_RSAES_OAEP)
    + _definite(
        _SEQUENCE,  # RSAES-OAEP-params (RFC 4055 §4.1); pSourceAlgorithm [2] left at its default
        _definite(_CONTEXT_0_CONSTRUCTED, _SHA256_IDENTIFIER)  # hashAlgorithm
        + _definite(  # maskGenAlgorithm
            _CONTEXT_1_CONSTRUCTED,
            _definite(_SEQUENCE, _oid(ID_MGF1) + _SHA256_IDENTIFIER),
        ),
    ),
)


# -- the recipient's key ------------------------------------------------------------------------


def recipient_public_key(spki_der: bytes) -> rsa.RSAPublicKey:
    """The RSA public key of a ``Recipient``: ``spki_der`` is the attestation document's
    ``public_key``, a DER SubjectPublicKeyInfo, with a modulus of 2048 to 4096 bits.

    ``spki_der`` comes from the requester (through the untrusted parent); it is checked, not
    trusted. Raises :class:`RecipientError`.
    """
    try:
        key = serialization.load_der_public_key(spki_der)
    except (ValueError, TypeError) as exc:
        raise RecipientError(
            "the attestation document's public_key is not a DER SubjectPublicKeyInfo"
        ) from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise RecipientError(
            f"the attestation document's public_key is a {type(key).__name__}; "
            "RSAES_OAEP_SHA_256 needs an RSA key"
        )
    # cryptography also reads a bare PKCS#1 RSAPublicKey; KMS wants the SPKI, in DER: the bytes
    # must be exactly the key's canonical SubjectPublicKeyInfo.
    canonical = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if canonical != spki_der:
        raise RecipientError(
            "the attestation document's public_key is not a DER SubjectPublicKeyInfo "
            "(another encoding of an RSA key)"
        )
    if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
        raise RecipientError(
            f"the attestation document's RSA key has {key.key_size} bits; "
            f"KMS accepts {MIN_RSA_BITS} to {MAX_RSA_BITS}"
        )
    return key


def subject_key_identifier(public_key: rsa.RSAPublicKey) -> bytes:
    """SHA-1 of the subjectPublicKey BIT STRING's contents (RFC 5280 §4.2.1.2, method 1)."""
    return x509.SubjectKeyIdentifier.from_public_key(public_key).digest


# -- the envelope -------------------------------------------------------------------------------


def envelope_for_recipient(
    plaintext: bytes,
    recipient_spki_der: bytes,
    *,
    rng: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """``CiphertextForRecipient``: ``plaintext`` in a BER CMS EnvelopedData for the recipient.

    ``recipient_spki_der`` is the ``public_key`` of an attestation document the caller has already
    verified (it comes from the requester, through the untrusted parent). ``rng`` draws the
    content-encryption key and the IV; the RSA-OAEP seed comes from OpenSSL's own generator, so the
    output differs between calls even with a fixed ``rng``. Raises :class:`RecipientError`.
    """
    # (1) the recipient's key and its identifier (RFC 5652 §6.2.1: rid subjectKeyIdentifier).
    public_key = recipient_public_key(recipient_spki_der)
    key_id = subject_key_identifier(public_key)
    # (2) a fresh content-encryption key and IV (RFC 3565 §4.1).
    cek = rng(CEK_SIZE)
    iv = rng(IV_SIZE)
    if len(cek) != CEK_SIZE or len(iv) != IV_SIZE:
        raise ValueError("rng returned fewer bytes than asked for")
    # (3) key transport: RSAES-OAEP with SHA-256 and MGF1-SHA-256, empty label (RFC 4055 §4).
    encrypted_key = public_key.encrypt(
        cek, OAEP(mgf=MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    )
    # (4) content encryption: PKCS#7 padding (RFC 5652 §6.3), AES-256-CBC.
    padder = padding.PKCS7(algorithms.AES.block_size).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(cek), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    # (5) KeyTransRecipientInfo (RFC 5652 §6.2.1), definite length as a streaming encoder
    # writes the parts it knows in full.
    recipient_info = _definite(
        _SEQUENCE,
        _small_integer(2)  # version 2: rid is a subjectKeyIdentifier
        + _definite(_CONTEXT_0_PRIMITIVE, key_id)  # rid [0] IMPLICIT SubjectKeyIdentifier
        + _OAEP_SHA256_IDENTIFIER
        + _definite(_OCTET_STRING, encrypted_key),
    )
    # (6) EncryptedContentInfo (RFC 5652 §6.1); encryptedContent [0] IMPLICIT OCTET STRING in
    # its constructed form, one primitive OCTET STRING per chunk (X.690 §8.7.3).
    chunks = (
        _definite(_OCTET_STRING, ciphertext[offset : offset + CONTENT_CHUNK_SIZE])
        for offset in range(0, len(ciphertext), CONTENT_CHUNK_SIZE)
    )
    encrypted_content_info = _indefinite(
        _SEQUENCE,
        [
            _oid(ID_DATA),
            _definite(_SEQUENCE, _oid(ID_AES256_CBC) + _definite(_OCTET_STRING, iv)),
            _indefinite(_CONTEXT_0_CONSTRUCTED, chunks),
        ],
    )
    # (7) EnvelopedData version 2 (RFC 5652 §6.1: a version 2 RecipientInfo is present) inside
    # ContentInfo (RFC 5652 §3), both with indefinite lengths.
    enveloped_data = _indefinite(
        _SEQUENCE,
        [_small_integer(2), _definite(_SET, recipient_info), encrypted_content_info],
    )
    return _indefinite(
        _SEQUENCE,
        [_oid(ID_ENVELOPED_DATA), _indefinite(_CONTEXT_0_CONSTRUCTED, [enveloped_data])],
    )
