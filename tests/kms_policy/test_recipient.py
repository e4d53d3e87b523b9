"""The KMS side of ``Recipient``: the recipient key rules and the BER CMS envelope writer.

The writer is checked three ways: a small BER walker below (the exact framing: indefinite
lengths, chunked content), ``openssl cms -decrypt`` (an independent CMS implementation), and the
layout ``openssl cms -encrypt -stream -keyid`` produces for the same key (the same offsets).
The round trip through the enclave's parser lives in tests/enclave/test_keyrelease.py.
"""

from __future__ import annotations

import hashlib
import itertools
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kms_policy.recipient import (
    CONTENT_CHUNK_SIZE,
    RecipientError,
    envelope_for_recipient,
    recipient_public_key,
    subject_key_identifier,
)
from tests.x509util import self_signed

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl is not on PATH")

# The keyEncryptionAlgorithm exactly as `openssl cms -encrypt -keyopt rsa_padding_mode:oaep
# -keyopt rsa_oaep_md:sha256 -keyopt rsa_mgf1_md:sha256` (OpenSSL 3.0.19) writes it.
OPENSSL_OAEP_SHA256 = bytes.fromhex(
    "303806092a864886f70d010107302ba00d300b0609608648016503040201"
    "a11a301806092a864886f70d010108300b0609608648016503040201"
)
ENVELOPED_DATA_OID = bytes.fromhex("06092a864886f70d010703")
AES256_CBC_OID = bytes.fromhex("060960864801650304012a")


def spki(key: rsa.RSAPrivateKey | rsa.RSAPublicKey | ec.EllipticCurvePrivateKey) -> bytes:
    public = key if isinstance(key, rsa.RSAPublicKey) else key.public_key()
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def counting_rng() -> Callable[[int], bytes]:
    counter = itertools.count()
    return lambda n: bytes(next(counter) % 256 for _ in range(n))


# -- a BER walker, independent of the writer ----------------------------------------------------


@dataclass
class Node:
    tag: int
    indefinite: bool
    content: bytes = b""  # primitive values only
    children: list[Node] = field(default_factory=list)


def _read(data: bytes, offset: int) -> tuple[Node, int]:
    tag = data[offset]
    first = data[offset + 1]
    offset += 2
    constructed = bool(tag & 0x20)
    if first == 0x80:
        assert constructed, "indefinite length on a primitive value"
        node = Node(tag, indefinite=True)
        while data[offset : offset + 2] != b"\x00\x00":
            child, offset = _read(data, offset)
            node.children.append(child)
        return node, offset + 2
    if first & 0x80:
        count = first & 0x7F
        length = int.from_bytes(data[offset : offset + count], "big")
        offset += count
    else:
        length = first
    body = data[offset : offset + length]
    assert len(body) == length, "truncated"
    node = Node(tag, indefinite=False)
    if constructed:
        inner = 0
        while inner < length:
            child, inner = _read(body, inner)
            node.children.append(child)
    else:
        node.content = body
    return node, offset + length


def walk(data: bytes) -> Node:
    node, end = _read(data, 0)
    assert end == len(data), "trailing data"
    return node


def walk_all(node: Node) -> Iterator[Node]:
    yield node
    for child in node.children:
        yield from walk_all(child)


# -- openssl ------------------------------------------------------------------------------------


def openssl(*args: str, data: bytes = b"") -> bytes:
    assert OPENSSL is not None
    done = subprocess.run([OPENSSL, *args], input=data, capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def write_key_and_cert(private: rsa.RSAPrivateKey, folder: Path) -> tuple[Path, Path]:
    key_path, cert_path = folder / "key.pem", folder / "cert.pem"
    key_path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(
        self_signed(private, "nci test recipient").public_bytes(serialization.Encoding.PEM)
    )
    return key_path, cert_path


# -- the recipient key --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2048, 3072, 4096])
def test_accepts_rsa_keys_kms_accepts(bits: int) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    assert recipient_public_key(spki(private)).key_size == bits


def _large_public_key(bits: int) -> rsa.RSAPublicKey:
    # No need to generate a private key to test the upper bound: any odd modulus of that size.
    modulus = (1 << (bits - 1)) | 0xFFFF_FFFF
    return rsa.RSAPublicNumbers(e=65537, n=modulus).public_key()


@pytest.mark.parametrize(
    ("name", "make", "match"),
    [
        (
            "rsa_1024",
            lambda: spki(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
            "1024 bits",
        ),
        ("rsa_4097", lambda: spki(_large_public_key(4097)), "4097 bits"),
        ("rsa_8192", lambda: spki(_large_public_key(8192)), "8192 bits"),
        ("ec_p384", lambda: spki(ec.generate_private_key(ec.SECP384R1())), "RSA key"),
        ("empty", lambda: b"", "not a DER SubjectPublicKeyInfo"),
        ("garbage", lambda: b"\x30\x03\x02\x01\x01", "not a DER SubjectPublicKeyInfo"),
        (
            "pkcs1_not_spki",
            lambda: (
                rsa.generate_private_key(public_exponent=65537, key_size=2048)
                .public_key()
                .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
            ),
            "not a DER SubjectPublicKeyInfo",
        ),
    ],
)
def test_rejects_recipient_key_kms_would_refuse(
    name: str, make: Callable[[], bytes], match: str
) -> None:
    with pytest.raises(RecipientError, match=match):
        recipient_public_key(make())


def test_envelope_refuses_a_bad_recipient_key() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(RecipientError, match="1024 bits"):
        envelope_for_recipient(b"k" * 32, spki(weak))


def test_subject_key_identifier_is_sha1_of_the_subject_public_key(key: rsa.RSAPrivateKey) -> None:
    # RFC 5280 §4.2.1.2 method 1: SHA-1 of the BIT STRING's value (the DER RSAPublicKey),
    # excluding tag, length and unused-bits octet.
    rsa_public_key = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.PKCS1
    )
    expected = hashlib.sha1(rsa_public_key, usedforsecurity=False).digest()
    assert subject_key_identifier(key.public_key()) == expected
    spki_bytes = spki(key)
    assert spki_bytes.endswith(b"\x00" + rsa_public_key)  # unused-bits octet, then the value


# -- the envelope's framing ---------------------------------------------------------------------


def test_envelope_is_ber_with_indefinite_lengths_and_chunked_content(
    key: rsa.RSAPrivateKey,
) -> None:
    plaintext = b"\x42" * 32
    blob = envelope_for_recipient(plaintext, spki(key), rng=counting_rng())
    root = walk(blob)
    # ContentInfo SEQUENCE (indefinite) { OID envelopedData, [0] (indefinite) { EnvelopedData } }
    assert (root.tag, root.indefinite) == (0x30, True)
    content_type, explicit = root.children
    assert content_type.tag == 0x06
    assert b"\x06\x09" + content_type.content == ENVELOPED_DATA_OID
    assert (explicit.tag, explicit.indefinite) == (0xA0, True)
    (enveloped,) = explicit.children
    assert (enveloped.tag, enveloped.indefinite) == (0x30, True)
    version, recipient_infos, content_info = enveloped.children
    assert (version.tag, version.content) == (0x02, b"\x02")
    assert (recipient_infos.tag, len(recipient_infos.children)) == (0x31, 1)
    ktri_version, rid, key_algorithm, encrypted_key = recipient_infos.children[0].children
    assert ktri_version.content == b"\x02"
    assert (rid.tag, rid.content) == (0x80, subject_key_identifier(key.public_key()))
    assert encrypted_key.tag == 0x04
    assert len(encrypted_key.content) == 256
    assert OPENSSL_OAEP_SHA256 in blob
    assert key_algorithm.tag == 0x30
    # EncryptedContentInfo (indefinite) { id-data, aes256-CBC + IV, [0] chunks (indefinite) }
    assert (content_info.tag, content_info.indefinite) == (0x30, True)
    data_type, algorithm, encrypted = content_info.children
    assert data_type.content == bytes.fromhex("2a864886f70d010701")
    assert AES256_CBC_OID in blob
    iv = algorithm.children[1].content
    assert len(iv) == 16
    assert (encrypted.tag, encrypted.indefinite) == (0xA0, True)
    assert [len(chunk.content) for chunk in encrypted.children] == [32, 16]
    assert all(chunk.tag == 0x04 for chunk in encrypted.children)
    # the rng supplied the CEK (bytes 0..31) and the IV (bytes 32..47)
    assert iv == bytes(range(32, 48))


@pytest.mark.parametrize(
    ("size", "chunks"), [(0, [16]), (1, [16]), (16, [32]), (100, [32, 32, 32, 16])]
)
def test_envelope_chunks_ciphertext(key: rsa.RSAPrivateKey, size: int, chunks: list[int]) -> None:
    blob = envelope_for_recipient(b"\x00" * size, spki(key))
    content = walk(blob).children[1].children[0].children[2].children[2]
    assert [len(chunk.content) for chunk in content.children] == chunks
    assert CONTENT_CHUNK_SIZE == 32


def test_envelope_uses_a_fresh_content_key_per_call(key: rsa.RSAPrivateKey) -> None:
    first = envelope_for_recipient(b"\x01" * 32, spki(key))
    second = envelope_for_recipient(b"\x01" * 32, spki(key))
    assert first != second
    assert first[-60:] != second[-60:]  # the IV and the ciphertext differ too


def test_envelope_rejects_a_short_rng(key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError, match="rng"):
        envelope_for_recipient(b"k", spki(key), rng=lambda n: b"\x00" * (n - 1))


# -- openssl as the independent reader and reference writer ----------------------------------


@needs_openssl
@pytest.mark.parametrize("size", [0, 1, 32, 1000, 4096])
def test_openssl_decrypts_our_envelope(key: rsa.RSAPrivateKey, tmp_path: Path, size: int) -> None:
    key_path, cert_path = write_key_and_cert(key, tmp_path)
    plaintext = bytes(i % 251 for i in range(size))
    blob = envelope_for_recipient(plaintext, spki(key))
    envelope_path = tmp_path / "envelope.ber"
    envelope_path.write_bytes(blob)
    # With the key alone openssl tries it on every KeyTransRecipientInfo...
    decrypted = openssl(
        "cms", "-decrypt", "-inform", "DER", "-in", str(envelope_path), "-inkey", str(key_path)
    )
    assert decrypted == plaintext
    # ...and with the certificate it finds the recipient by subjectKeyIdentifier.
    by_id = openssl(
        "cms",
        "-decrypt",
        "-inform",
        "DER",
        "-in",
        str(envelope_path),
        "-inkey",
        str(key_path),
        "-recip",
        str(cert_path),
    )
    assert by_id == plaintext


@needs_openssl
def test_envelope_has_the_layout_of_openssl_streaming_output(
    key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    _, cert_path = write_key_and_cert(key, tmp_path)
    plaintext = b"\x07" * 32
    reference = openssl(
        "cms",
        "-encrypt",
        "-binary",
        "-stream",
        "-aes256",
        "-keyid",
        "-recip",
        str(cert_path),
        "-keyopt",
        "rsa_padding_mode:oaep",
        "-keyopt",
        "rsa_oaep_md:sha256",
        "-keyopt",
        "rsa_mgf1_md:sha256",
        "-outform",
        "DER",
        data=plaintext,
    )
    ours = envelope_for_recipient(plaintext, spki(key))

    def shape(node: Node) -> tuple[object, ...]:
        return (
            node.tag,
            node.indefinite,
            len(node.content),
            tuple(shape(child) for child in node.children),
        )

    assert shape(walk(ours)) == shape(walk(reference))
    assert len(ours) == len(reference)
    assert OPENSSL_OAEP_SHA256 in reference
